"""Incremental detokenization of one sequence, the way vLLM does it.

Text is produced from a short window of token strings, `tokens[prefix_offset:]`. The text of
`tokens[prefix_offset:read_offset]` was already emitted; decoding the window and cutting that
prefix off gives the new text. New text that ends in U+FFFD is held back: the last token
stopped inside a multi-byte character, and a later token completes it. Once the text is
released the window slides (`prefix_offset, read_offset = read_offset, len(tokens)`), so each
step decodes a few tokens, not the whole sequence.

The window starts on the last prompt tokens, so the first generated token is decoded in
context (a leading space, a merge across the boundary) exactly as in the full text.

NOTE: for byte-level BPE, the concatenation of every `push` and the final `flush` equals
`tokenizer.decode(generated_ids, skip_special_tokens=...)`: the window only moves at a
character boundary, where UTF-8 decoding restarts cleanly. One exception keeps each step
bounded: after `MAX_HELD_TOKENS` tokens that all end in U+FFFD (bytes that are not UTF-8,
not an unfinished character) the text is released as it stands.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .tokenizer import TokenizerHandle

# Prompt tokens decoded as context before the first generated one (vLLM's value), plus a
# little more in case some of them are skipped special tokens.
PROMPT_CONTEXT_TOKENS = 5
_PROMPT_CONTEXT_EXTRA = 2
_REPLACEMENT = "\ufffd"
# A character is at most 4 UTF-8 bytes, so a longer run of held tokens is invalid bytes, not
# an unfinished character; releasing it keeps the decoded window short.
MAX_HELD_TOKENS = 16
_TRIM_AT = 256


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas; `flush()` releases what is held back."""

    __slots__ = (
        "_handle",
        "_skip_ids",
        "_tokens",
        "_prefix_offset",
        "_read_offset",
        "_prefix_text",
        "_one_token_texts",
    )

    def __init__(
        self,
        handle: TokenizerHandle,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self._handle = handle
        self._skip_ids = handle.skip_ids if skip_special_tokens else frozenset()
        context = prompt_token_ids[-(PROMPT_CONTEXT_TOKENS + _PROMPT_CONTEXT_EXTRA) :]
        tokens = [handle.id_to_token(i) for i in context if i not in self._skip_ids]
        # A prompt that ends inside a character would glue its bytes to the first generated
        # ones; drop that unfinished tail so generated text decodes as it does on its own.
        while tokens and handle.tokens_to_string(tokens).endswith(_REPLACEMENT):
            tokens.pop()
        self._tokens = tokens
        self._read_offset = len(self._tokens)
        self._prefix_offset = max(self._read_offset - PROMPT_CONTEXT_TOKENS, 0)
        self._prefix_text: str | None = None  # decode of tokens[prefix:read], computed lazily
        # NOTE: after the window slides, its prefix is usually the one token just released,
        # decoded on its own: a pure function of that token, so the handle keeps each such
        # text (at most one per vocabulary entry) and most steps make one decode call, not two.
        self._one_token_texts: dict[str, str] | None = getattr(handle, "one_token_texts", None)

    def push(self, token_ids: Iterable[int]) -> str:
        """Add generated ids; return the text they complete (possibly "")."""
        out = []
        for token_id in token_ids:
            if token_id in self._skip_ids:
                continue
            self._tokens.append(self._handle.id_to_token(token_id))
            delta = self._step(final=False)
            if delta:
                out.append(delta)
        return "".join(out)

    def flush(self) -> str:
        """End of sequence: release held-back text, U+FFFD and all (as a full decode has it)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        to_string = self._handle.tokens_to_string
        if self._prefix_text is None:
            window = self._tokens[self._prefix_offset : self._read_offset]
            memo = self._one_token_texts
            if memo is not None and len(window) == 1:
                text = memo.get(window[0])
                if text is None:
                    text = memo[window[0]] = to_string(window)
                self._prefix_text = text
            else:
                self._prefix_text = to_string(window)
        prefix_text = self._prefix_text
        new_text = to_string(self._tokens[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return ""  # nothing new: an empty token
        if (
            not final
            and new_text.endswith(_REPLACEMENT)
            and len(self._tokens) - self._read_offset <= MAX_HELD_TOKENS
        ):
            return ""  # a character still unfinished: wait for its next byte
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._prefix_text = None
        if self._prefix_offset > _TRIM_AT:  # tokens before the window are never read again
            del self._tokens[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text[len(prefix_text) :]
