"""One detokenization stream: incremental text plus stop strings, for one sequence.

This is the state behind one `DetokenizeStream` call, free of gRPC. The protocol:

- `push(ids)` for each `tokens` message with ids: the text they release (held back while a
  character is unfinished or the tail could start a stop string).
- `finish()` for a `tokens` message with no ids, the end-of-sequence flush: the held text,
  with `flushed` set. A stream that ends without it drops the held text; ids sent after it
  are refused, another flush returns nothing.
- After a stop string matched, every response is empty with `stopped` set.

Token ids past the tokenizer's vocabulary (a model whose embedding is padded past it) decode
to nothing, as in `tokenizer.decode`; negative ids are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .detokenizer import IncrementalDetokenizer
from .errors import InvalidRequest
from .stop_strings import StopStringChecker
from .tokenizer import TokenizerHandle


@dataclass(slots=True)
class StreamDelta:
    """One response of the stream (mirrors `DetokenizeStreamResponse`)."""

    text: str
    stopped: bool = False
    stop_reason: str = ""
    flushed: bool = False


class SequenceStream:
    """Detokenizes one sequence's generated ids and applies its stop strings."""

    __slots__ = ("_detok", "_stop", "_flushed")

    def __init__(
        self,
        handle: TokenizerHandle,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        max_stop_strings: int = 64,
    ):
        if len(stop) > max_stop_strings:
            raise InvalidRequest(
                f"{len(stop)} stop strings given; at most {max_stop_strings} are allowed"
            )
        _check_non_negative(prompt_token_ids, "prompt token id")
        self._detok = IncrementalDetokenizer(handle, prompt_token_ids, skip_special_tokens)
        self._stop = StopStringChecker(stop, include_stop_str_in_output) if stop else None
        self._flushed = False

    def push(self, token_ids: Sequence[int]) -> StreamDelta:
        """New generated ids in; the text they release out."""
        stop = self._stop
        if stop is not None and stop.stopped is not None:
            return StreamDelta("", True, stop.stopped)
        if self._flushed:
            raise InvalidRequest("token ids sent after the end-of-sequence flush")
        _check_non_negative(token_ids, "token id")
        text = self._detok.push(token_ids)
        if stop is None:
            return StreamDelta(text)
        result = stop.push(text)
        if result.stop is None:
            return StreamDelta(result.text)
        return StreamDelta(result.text, True, result.stop)

    def finish(self) -> StreamDelta:
        """End of sequence: release everything held back. Repeating it returns nothing."""
        stop = self._stop
        if stop is not None and stop.stopped is not None:
            return StreamDelta("", True, stop.stopped, flushed=True)
        if self._flushed:
            return StreamDelta("", flushed=True)
        self._flushed = True
        text = self._detok.flush()
        if stop is None:
            return StreamDelta(text, flushed=True)
        result = stop.push(text)
        if result.stop is not None:
            return StreamDelta(result.text, True, result.stop, flushed=True)
        return StreamDelta(result.text + stop.flush(), flushed=True)


def _check_non_negative(token_ids: Sequence[int], what: str) -> None:
    if token_ids and min(token_ids) < 0:
        raise InvalidRequest(f"{what} {min(token_ids)} is negative")
