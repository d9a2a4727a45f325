"""vLLM's request extensions beyond OpenAI's: the ones splitserve serves, and the ones it
refuses by name rather than ignore (a silently dropped field would change the answer).

Served: `allowed_token_ids` and `bad_words` (applied by the sampler on the last worker rank),
`return_tokens_as_token_ids`, `request_id`. Refused with a 400 naming the field: beam search
(`use_beam_search`, and `length_penalty`, which only beam search reads), per-request logits
processors (`logits_processors`, `vllm_xargs`), disaggregated-prefill `kv_transfer_params`,
`prompt_embeds` and `mm_processor_kwargs` (no embedding inputs; images use the processor as saved).
"""

from __future__ import annotations

import re
from typing import Any

from splitserve.gateway.errors import bad_request

MAX_ALLOWED_TOKEN_IDS = 1 << 20
"""Cap on the length of allowed_token_ids (each id is checked against the vocabulary)."""
MAX_BAD_WORDS = 256
"""Cap on the number of bad_words."""
MAX_BAD_WORD_CHARS = 256
"""Cap on the length of one bad word."""
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

_REFUSED: tuple[tuple[str, str], ...] = (
    ("logits_processors", "per-request logits processors are not supported by this server"),
    (
        "vllm_xargs",
        "vllm_xargs feed custom logits processors, which this server does not have",
    ),
    (
        "kv_transfer_params",
        "kv_transfer_params (disaggregated prefill) are not supported by this server",
    ),
    ("prompt_embeds", "prompt_embeds are not supported by this server; send text or token ids"),
    (
        "mm_processor_kwargs",
        "mm_processor_kwargs are not supported: images are processed with the model folder's "
        "processor settings",
    ),
)


def refuse_unsupported(req: Any) -> None:
    """A 400 naming the first vLLM extension the request sets that splitserve does not serve."""
    if getattr(req, "use_beam_search", False):
        raise bad_request(
            "beam search (use_beam_search) is not supported by this server; use n or "
            "sampling instead",
            "use_beam_search",
        )
    length_penalty = getattr(req, "length_penalty", 1.0)
    if length_penalty != 1.0:
        raise bad_request(
            f"length_penalty applies only to beam search, which this server does not "
            f"support; got {length_penalty}",
            "length_penalty",
        )
    for name, message in _REFUSED:
        if getattr(req, name, None) is not None:
            raise bad_request(message, name)


def allowed_token_ids(ids: list[int] | None) -> list[int] | None:
    """The deduplicated ids (None when unset); emptiness and the vocabulary are checked with
    the other sampling fields (splitserve.common.sampling_params.validate)."""
    if ids is None:
        return None
    if len(ids) > MAX_ALLOWED_TOKEN_IDS:
        raise bad_request(
            f"allowed_token_ids may hold at most {MAX_ALLOWED_TOKEN_IDS} ids, got {len(ids)}",
            "allowed_token_ids",
        )
    return list(dict.fromkeys(ids))


def check_bad_words(words: list[str] | None) -> list[str]:
    if not words:
        return []
    if len(words) > MAX_BAD_WORDS:
        raise bad_request(
            f"at most {MAX_BAD_WORDS} bad_words are allowed, got {len(words)}", "bad_words"
        )
    for w in words:
        if not w.strip():
            raise bad_request("bad_words must not hold empty or blank strings", "bad_words")
        if len(w) > MAX_BAD_WORD_CHARS:
            raise bad_request(
                f"bad_words must be at most {MAX_BAD_WORD_CHARS} characters, got one of {len(w)}",
                "bad_words",
            )
    return words


def response_id(prefix: str, request_id: str | None) -> str | None:
    """vLLM's response id when the request sent its own request_id (the prefix plus it);
    None otherwise. The engine-side ids stay random, so two requests sending the same
    request_id never collide in the scheduler."""
    if request_id is None:
        return None
    if not _REQUEST_ID.fullmatch(request_id):
        raise bad_request(
            "request_id must be 1 to 128 characters of letters, digits and . _ : -",
            "request_id",
        )
    return f"{prefix}-{request_id}"
