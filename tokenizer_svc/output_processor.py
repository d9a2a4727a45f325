"""One sequence's output handling, shared by every front end (the gateway, the in-process LLM).

Each step's new tokens of a sequence go through `OutputProcessor.process`: they are detokenized
(`SequenceStream`: incremental text and stop strings), the token that stopped the sequence is
counted but not detokenized (vLLM), a stop string cuts the text and the tokens counted at the
token that completed it, and the finish reason and stop reason are decided. What comes out is
a `SequenceDelta`. Errors (an engine error, a refused request) are the front end's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from splitserve.protos import common_pb2

from .stream import SequenceStream

_FINISH = common_pb2.FinishReason
# NOTE: plain ints: an attribute of a protobuf enum wrapper is a slow lookup on a hot path.
_UNSPECIFIED = int(_FINISH.FINISH_REASON_UNSPECIFIED)
_STOP = int(_FINISH.FINISH_REASON_STOP)
FINISH_NAMES = {
    _STOP: "stop",
    int(_FINISH.FINISH_REASON_LENGTH): "length",
    int(_FINISH.FINISH_REASON_ABORT): "abort",
}


@dataclass(slots=True)
class SequenceDelta:
    """New output of one sequence: text, the tokens counted for it, and finish state."""

    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprobs]
    num_prompt_tokens: int
    prompt_logprobs: list[common_pb2.TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    """Prompt tokens the scheduler found in the prefix cache (so far)."""


class OutputProcessor:
    """Turns one sequence's step outputs into `SequenceDelta`s."""

    __slots__ = (
        "stream",
        "has_stop_strings",
        "include_stop_str_in_output",
        "stop_token_ids",
        "eos",
        "want_logprobs",
        "prompt_lps",
        "num_prompt",
        "cached",
        "done",
        "stopped_by_string",
    )

    def __init__(
        self,
        stream: SequenceStream | None,
        num_prompt_tokens: int,
        *,
        has_stop_strings: bool = False,
        include_stop_str_in_output: bool = False,
        stop_token_ids: frozenset[int] = frozenset(),
        eos: frozenset[int] = frozenset(),
        want_logprobs: bool = False,
        want_prompt_logprobs: bool = False,
    ) -> None:
        self.stream = stream
        """None: no detokenization (text stays empty, stop strings are not matched)."""
        self.has_stop_strings = has_stop_strings and stream is not None
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_token_ids = stop_token_ids
        """The request's own stop token ids (reported as stop_reason, EOS ids are not)."""
        self.eos = eos
        self.want_logprobs = want_logprobs
        # NOTE: prompt logprobs may span several outputs (chunked prefill); they are gathered
        # and handed out with the first delta.
        self.prompt_lps: list | None = [] if want_prompt_logprobs else None
        self.num_prompt = num_prompt_tokens
        self.cached = 0
        self.done = False
        """The sequence has ended (its last delta, with finish_reason, is out)."""
        self.stopped_by_string = False
        """It ended on a stop string: the scheduler still runs it, the caller aborts it."""

    def process(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence,
        prompt_logprobs: Sequence,
        finish_reason: int,
        stop_token_id: int | None,
        num_prompt_tokens: int = 0,
        num_cached_tokens: int = 0,
    ) -> SequenceDelta | None:
        """One output (not an error); the delta to show, or None when there is nothing new."""
        ids = list(token_ids)
        finish = finish_reason
        if num_prompt_tokens:
            self.num_prompt = num_prompt_tokens
        if num_cached_tokens > self.cached:
            self.cached = num_cached_tokens
        detok_ids = ids
        if (
            finish == _STOP
            and ids
            and not self.include_stop_str_in_output
            and (ids[-1] in self.eos or ids[-1] == stop_token_id)
        ):
            # vLLM: the token that stopped the sequence is counted but not detokenized.
            detok_ids = ids[:-1]
        if self.prompt_lps is not None and prompt_logprobs:
            self.prompt_lps.extend(prompt_logprobs)
        text, stop_str, used = self._detokenize(detok_ids)
        lps = list(logprobs) if self.want_logprobs else []
        if stop_str is not None:
            self.stopped_by_string = True
            return self._delta(text, ids[:used], lps[:used], "stop", stop_str)
        if finish == _UNSPECIFIED:
            return self._delta(text, ids, lps) if (ids or text) else None
        tail = self.stream.finish() if self.stream is not None else None
        if tail is not None:
            if tail.stopped:
                return self._delta(text + tail.text, ids, lps, "stop", tail.stop_reason)
            text += tail.text
        stop_reason = None
        if finish == _STOP and stop_token_id is not None:
            tid = stop_token_id
            stop_reason = tid if (tid in self.stop_token_ids or tid not in self.eos) else None
        return self._delta(text, ids, lps, FINISH_NAMES.get(finish, "stop"), stop_reason)

    def _detokenize(self, ids: list[int]) -> tuple[str, str | None, int]:
        """(new text, matched stop string or None, tokens up to and including the match)."""
        if not ids or self.stream is None:
            return "", None, len(ids)
        if self.has_stop_strings and len(ids) > 1:
            # NOTE: with stop strings, ids go in one at a time so a match names the exact
            # token that completed it, which is what usage counts.
            parts = []
            for k, token_id in enumerate(ids):
                d = self.stream.push((token_id,))
                parts.append(d.text)
                if d.stopped:
                    return "".join(parts), d.stop_reason, k + 1
            return "".join(parts), None, len(ids)
        d = self.stream.push(ids)
        return d.text, (d.stop_reason if d.stopped else None), len(ids)

    def _delta(self, text, ids, logprobs, finish=None, stop_reason=None) -> SequenceDelta:
        prompt_lps, self.prompt_lps = self.prompt_lps, None
        if finish is not None:
            self.done = True
        return SequenceDelta(
            text, ids, logprobs, self.num_prompt, prompt_lps, finish, stop_reason, self.cached
        )
