"""One request's work before generation, in one place: prompts rendered and tokenized, bad
words tokenized, truncation and echo text. The tokenizer service's `Prepare` RPC runs it (with
the constraint compiled beside it, see `server.py`), and the in-process `LLM` calls the same
functions directly, so the two front ends cannot tokenize a request differently.

Why one call: a gateway used to make three sequential round trips per request (bad words,
grammar, chat template) before the first token, and the scheduler a fourth. Everything here
needs only the tokenizer, so it belongs to one RPC; the constraint compile runs concurrently
with the prompt work inside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from splitserve.common.sampling_params import bad_word_variants
from splitserve.protos import common_pb2, tokenizer_pb2

if TYPE_CHECKING:  # the gateway imports this module for its constants, not the tokenizer
    from .tokenizer import TokenizerHandle

PART_METADATA_KEY = "splitserve-prepare-part"
"""Trailing-metadata key of a refused Prepare call: which part was at fault."""
PART_PROMPT = "prompt"
PART_GRAMMAR = "grammar"


@dataclass(slots=True)
class Prepared:
    """One prompt, ready for the engine."""

    token_ids: list[int]
    text: str | None
    """The prompt text, None when only ids are known (see PreparedPrompt.text)."""
    mm_inputs: list[common_pb2.MultiModalInput] = field(default_factory=list)
    audio_start_seconds: float = 0.0
    """Transcription prompts: where the prompt's audio chunk starts in the file."""


def bad_words_token_ids(handle: TokenizerHandle, words: Iterable[str]) -> list[list[int]]:
    """The token sequences to ban for `words`: each spelling of each word (bad_word_variants),
    without special tokens, deduplicated in order; a spelling with no tokens bans nothing."""
    seqs: dict[tuple[int, ...], None] = {}
    for word in words:
        for text in bad_word_variants(word):
            ids = tuple(handle.encode(text, add_special_tokens=False))
            if ids:
                seqs[ids] = None
    return [list(s) for s in seqs]


def tokenize_prompts(handle: TokenizerHandle, prompts: tokenizer_pb2.PromptList) -> list[Prepared]:
    """Text prompts tokenized (special tokens as `add_special_tokens` says), id prompts kept."""
    out = []
    for p in prompts.prompts:
        if p.WhichOneof("kind") == "token_ids":
            out.append(Prepared(list(p.token_ids.token_ids), None))
        else:
            out.append(Prepared(handle.encode(p.text, prompts.add_special_tokens), p.text))
    return out


def finish_prompts(
    handle: TokenizerHandle,
    prompts: list[Prepared],
    truncate_prompt_tokens: int | None,
    return_text: bool,
) -> list[Prepared]:
    """Keep the last `truncate_prompt_tokens` ids of each prompt (its text is then taken as
    unknown, shortened or not), and with `return_text` decode the text of every prompt that
    has none (special tokens kept, as an echo shows them)."""
    for p in prompts:
        if truncate_prompt_tokens is not None:
            p.token_ids = p.token_ids[-truncate_prompt_tokens:]
            p.text = None
        if return_text and p.text is None:
            p.text = handle.decode(p.token_ids, False)
    return prompts


def to_proto(p: Prepared) -> tokenizer_pb2.PreparedPrompt:
    out = tokenizer_pb2.PreparedPrompt(
        token_ids=p.token_ids, mm_inputs=p.mm_inputs, audio_start_seconds=p.audio_start_seconds
    )
    if p.text is not None:
        out.text = p.text
    return out
