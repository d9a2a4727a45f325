"""Loading the tokenizer and the facts about it the rest of the service (and the gateway) use.

`TokenizerHandle` wraps a transformers tokenizer with what every RPC needs at hand: the
vocabulary size for id checks, the ids that `decode(skip_special_tokens=True)` drops, the
effective chat template, and the token-level primitives the incremental detokenizer calls.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

from splitserve.common.model_path import resolve_model_path

from .config import TokenizerServiceConfig, load_chat_template
from .errors import InvalidRequest

logger = logging.getLogger(__name__)

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, char -> byte: printable Latin-1 bytes stand for
    themselves, the other bytes for the code points from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in kept}
    shifted = (b for b in range(256) if b not in set(kept))
    for n, b in enumerate(shifted):
        table[chr(256 + n)] = b
    return table


_UNICODE_TO_BYTE = _byte_level_alphabet()


@dataclass(frozen=True, slots=True)
class TokenizerInfo:
    """What the gateway needs to validate requests (mirrors the `TokenizerInfo` proto)."""

    name: str
    vocab_size: int
    eos_token_id: int
    bos_token_id: int
    has_chat_template: bool
    max_token_chars: int


class TokenizerHandle:
    """A loaded tokenizer plus the facts derived from it once, at load time."""

    def __init__(self, tokenizer, name: str, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.name = name
        self.chat_template = chat_template
        """The operator's template override; None uses the tokenizer's own."""
        self.path = None
        """The resolved tokenizer folder, when loaded from one (model facts live beside it)."""
        self.vocab_size = len(tokenizer)
        self.tokenizer_json: str | None = None
        """The Rust tokenizer serialized, made on the first GetDecoder call."""
        self.is_fast = bool(getattr(tokenizer, "is_fast", False))
        self._byte_piece = _tekken_byte_piece(tokenizer)
        """id -> the token's raw bytes, for a mistral_common tekken tokenizer; else None."""
        self.skip_ids = self._init_skip_ids()
        self._init_token_lookup()
        self.one_token_texts: dict[str, str] = {}
        """`tokens_to_string([token])` of the tokens seen so far (IncrementalDetokenizer)."""

    def _init_skip_ids(self) -> frozenset[int]:
        # NOTE: these must be the ids `tokenizer.decode(skip_special_tokens=True)` drops, so
        # that streamed text equals a one-shot decode. The Rust decoder skips the added tokens
        # flagged special; the Python backend skips `all_special_ids`.
        if self.is_fast:
            added = self.tokenizer.backend_tokenizer.get_added_tokens_decoder()
            return frozenset(i for i, tok in added.items() if tok.special)
        return frozenset(self.tokenizer.all_special_ids)

    def _init_token_lookup(self) -> None:
        if self.is_fast:
            backend = self.tokenizer.backend_tokenizer
            self._id_to_token = backend.id_to_token  # the Rust call, no Python wrapper
            decoder = backend.decoder
            self.tokens_to_string = decoder.decode if decoder is not None else " ".join
        elif self._byte_piece is not None:
            # mistral_common has no tokens -> text step. Tekken tokens are byte strings: hold
            # each as Latin-1 text (one char per byte), so joined tokens give back their bytes.
            piece = self._byte_piece
            self._id_to_token = lambda token_id: piece(token_id).decode("latin-1")
            self.tokens_to_string = _latin1_tokens_to_text
        else:
            self._id_to_token = self.tokenizer.convert_ids_to_tokens
            self.tokens_to_string = self.tokenizer.convert_tokens_to_string

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: its piece or its text decoded alone,
        whichever is longer (a piece keeps the leading space marker a lone decode drops). A
        prompt of n tokens holds at most n times this many characters, unless the normalizer
        drops some; the gateway refuses longer texts before tokenizing them."""
        ids = range(self.vocab_size)
        texts, _ = self.decode_each(ids)
        longest_text = max(map(len, texts), default=0)
        return max(longest_text, max((len(self.id_to_token(i)) for i in ids), default=0))

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template or getattr(self.tokenizer, "chat_template", None))

    def info(self) -> TokenizerInfo:
        eos = self.tokenizer.eos_token_id
        bos = self.tokenizer.bos_token_id
        return TokenizerInfo(
            name=self.name,
            vocab_size=self.vocab_size,
            eos_token_id=-1 if eos is None else int(eos),
            bos_token_id=-1 if bos is None else int(bos),
            has_chat_template=self.has_chat_template,
            max_token_chars=self.max_token_chars,
        )

    def id_to_token(self, token_id: int) -> str:
        """The token string of one id; "" for an id past the tokenizer (a padded model vocab)."""
        if token_id >= self.vocab_size:
            return ""
        return self._id_to_token(token_id) or ""

    def check_token_ids(self, token_ids, what: str = "token id") -> None:
        """Raise InvalidRequest unless every id is in [0, vocab_size)."""
        if not token_ids:
            return
        lo, hi = min(token_ids), max(token_ids)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidRequest(f"{what} {bad} is outside [0, {self.vocab_size})")

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        check_text(text, "text")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids, skip_special_tokens: bool) -> str:
        self.check_token_ids(token_ids)
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def decode_each(self, token_ids) -> tuple[list[str], list[bytes]]:
        """Each id decoded alone (special tokens as text), and its raw bytes.

        For logprobs' token strings: the text is `decode([id])`, so part of a character shows as
        U+FFFD, while the bytes are the token's own (a byte-level token maps back to its bytes;
        `<0xNN>` byte-fallback tokens to their byte). Ids past the tokenizer (a padded model
        vocabulary) give "" and b"", as `decode` does; negative ids are refused.
        """
        ids = [int(i) for i in token_ids]
        if ids and min(ids) < 0:
            raise InvalidRequest(f"token id {min(ids)} is negative")
        known = [i if i < self.vocab_size else None for i in ids]
        if self.is_fast:
            texts = self.tokenizer.backend_tokenizer.decode_batch(
                [[i] for i in ids if i < self.vocab_size], skip_special_tokens=False
            )
        else:
            texts = [self.tokenizer.decode([i]) for i in ids if i < self.vocab_size]
        it = iter(texts)
        strings = [next(it) if i is not None else "" for i in known]
        raw = [
            self._token_bytes(i, text) if i is not None else b"" for i, text in zip(known, strings)
        ]
        return strings, raw

    def _token_bytes(self, token_id: int, text: str) -> bytes:
        if self._byte_piece is not None:
            return self._byte_piece(token_id)
        token = self._id_to_token(token_id) or ""
        try:
            candidate = bytes(_UNICODE_TO_BYTE[c] for c in token)
        except KeyError:
            candidate = None
        # NOTE: accept a mapping only when it reproduces the decoded text, so tokens of other
        # schemes (Metaspace "▁the", added tokens) never come out as mangled bytes.
        if candidate is not None and candidate.decode("utf-8", "replace") == text:
            return candidate
        match = _BYTE_FALLBACK.fullmatch(token)
        if match is not None:
            return bytes([int(match.group(1), 16)])
        return text.encode("utf-8")


def _latin1_tokens_to_text(tokens: list[str]) -> str:
    return "".join(tokens).encode("latin-1").decode("utf-8", "replace")


def _tekken_byte_piece(tokenizer):
    """id -> bytes of a transformers MistralCommonBackend over a tekken tokenizer, else None."""
    if type(tokenizer).__name__ != "MistralCommonBackend":
        return None
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    tekken = tokenizer.tokenizer.instruct_tokenizer.tokenizer
    return lambda token_id: tekken.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)


def check_text(text: str, what: str) -> None:
    """Refuse text that cannot be UTF-8 (a lone surrogate, e.g. from a JSON `\\ud800` escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{what} contains a lone surrogate (U+{ord(text[exc.start]):04X}) at position "
            f"{exc.start}; text must be valid Unicode"
        ) from None


def load_tokenizer(config: TokenizerServiceConfig) -> TokenizerHandle:
    """Resolve `config.tokenizer` to a folder and load it as `config.tokenizer_mode` asks."""
    from transformers import AutoTokenizer

    revision = config.tokenizer_revision or config.revision
    path = resolve_model_path(
        config.tokenizer,
        revision,
        cache_dir=config.download_dir,
        hub_flags={
            "--revision": config.revision,
            "--tokenizer-revision": config.tokenizer_revision,
        },
    )
    kwargs: dict = {"trust_remote_code": config.trust_remote_code}
    if config.tokenizer_mode == "slow":
        kwargs["use_fast"] = False  # vLLM's meaning; transformers 5 ignores it, checked below
    if config.tokenizer_mode == "mistral":
        tokenizer = _load_mistral(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    is_fast = bool(getattr(tokenizer, "is_fast", False))
    if config.tokenizer_mode == "slow" and is_fast:
        raise ValueError(
            f"tokenizer_mode='slow' needs a Python (slow) tokenizer, but {config.tokenizer!r} "
            f"loads only as {type(tokenizer).__name__}, a Rust `tokenizers` tokenizer: "
            "transformers 5 has no slow tokenizer for this folder. Use tokenizer_mode 'auto'."
        )
    if config.tokenizer_mode == "fast" and not is_fast:
        raise ValueError(
            f"tokenizer_mode='fast' needs a Rust `tokenizers` tokenizer, but {config.tokenizer!r} "
            f"loads as {type(tokenizer).__name__}, a Python (slow) tokenizer. "
            "Use tokenizer_mode 'auto'."
        )
    template = load_chat_template(config.chat_template) if config.chat_template else None
    handle = TokenizerHandle(tokenizer, config.tokenizer, template)
    handle.path = path
    logger.info(
        "loaded tokenizer %s from %s: %s, vocab %d, chat template %s",
        config.tokenizer,
        path,
        type(tokenizer).__name__,
        handle.vocab_size,
        "override" if template else ("model" if handle.has_chat_template else "none"),
    )
    return handle


def _load_mistral(path):
    """mistral_common's tokenizer through transformers' MistralCommonBackend."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), mistral_format=True)
    except ImportError as exc:
        raise ValueError(
            f"tokenizer_mode 'mistral' needs the mistral_common package ({exc}): "
            "pip install mistral-common"
        ) from exc
    except OSError as exc:
        raise FileNotFoundError(
            f"tokenizer_mode 'mistral' needs a mistral_common tokenizer file (tekken.json) "
            f"in {path}: {exc}"
        ) from exc
    kind = getattr(getattr(tokenizer, "_tokenizer_type", None), "value", None)
    if kind != "tekken":
        raise ValueError(
            f"tokenizer_mode 'mistral' supports mistral_common's tekken tokenizers (tekken.json); "
            f"{path} holds a {kind} one: use tokenizer_mode 'auto'"
        )
    return tokenizer
