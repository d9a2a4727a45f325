"""Detokenization without the tokenizer service: a Rust tokenizer rebuilt from its JSON.

The tokenizer service ships `DecoderSpec` once (GetDecoder); a front end (the gateway) builds
a `DecodeHandle` from it and runs the same `SequenceStream` the service runs, so generated
tokens cost no call. It has exactly what `IncrementalDetokenizer` reads from a
`TokenizerHandle`: `skip_ids`, `id_to_token` and `tokens_to_string`, taken from the same Rust
tokenizer the service's fast `TokenizerHandle` uses, so both give the same text.
"""

from __future__ import annotations

from collections.abc import Iterable


class DecodeHandle:
    """The decode side of a Rust `tokenizers` tokenizer (no transformers, no model files)."""

    __slots__ = ("vocab_size", "skip_ids", "_id_to_token", "tokens_to_string", "one_token_texts")

    def __init__(self, tokenizer_json: str, skip_ids: Iterable[int], vocab_size: int) -> None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer_json)
        self.vocab_size = vocab_size
        self.skip_ids = frozenset(skip_ids)
        self._id_to_token = backend.id_to_token
        decoder = backend.decoder
        self.tokens_to_string = decoder.decode if decoder is not None else " ".join
        self.one_token_texts: dict[str, str] = {}
        """`tokens_to_string([token])` of the tokens seen so far (IncrementalDetokenizer)."""

    def id_to_token(self, token_id: int) -> str:
        """The token string of one id; "" for an id past the tokenizer (a padded model vocab)."""
        if token_id >= self.vocab_size:
            return ""
        return self._id_to_token(token_id) or ""
