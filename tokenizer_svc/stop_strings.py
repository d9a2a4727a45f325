"""Stop strings over a stream of text deltas.

`StopStringChecker.push(text)` returns the text that may be shown now. It holds back the
longest tail that is still the start of some stop string, so no character past a stop string
is ever released, even when the stop string arrives split over several tokens. When stop
strings complete, the one starting earliest wins (the longer one on a tie); the text is cut
at its start, or after it with `include_stop_str_in_output`. `flush()` at the end of the
sequence releases the held tail.

NOTE: every match starts inside the held text: a released character was, when released, not
the start of any stop string's prefix, so a later match cannot begin there. The search thus
only looks at the held tail plus the new text, O(new text + longest stop string) per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidRequest


@dataclass(slots=True)
class StopResult:
    """What one `push` releases."""

    text: str
    """Text that may be shown now."""
    stop: str | None = None
    """The stop string that matched; no more text follows."""


class StopStringChecker:
    """Finds stop strings in streamed text and holds back what could still become one."""

    __slots__ = ("_stops", "_include", "_held", "_stopped")

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stop):
            raise InvalidRequest("stop strings must not be empty")
        # Longest first, so that on equal start positions the longer stop string wins.
        self._stops = sorted(set(stop), key=len, reverse=True)
        self._include = include_stop_str_in_output
        self._held = ""
        self._stopped: str | None = None

    @property
    def stopped(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stopped

    def push(self, text: str) -> StopResult:
        """Take the next piece of text; return what may be released."""
        if self._stopped is not None:
            return StopResult("", self._stopped)
        if not text:
            return StopResult("")
        old_len = len(self._held)
        held = self._held + text
        best_start, best_stop = -1, None
        for s in self._stops:
            # A new match must end inside `text`, so it starts at old_len - len(s) + 1 or later.
            i = held.find(s, max(0, old_len - len(s) + 1))
            if i != -1 and (best_stop is None or i < best_start):
                best_start, best_stop = i, s
        if best_stop is not None:
            self._held = ""
            self._stopped = best_stop
            end = best_start + len(best_stop) if self._include else best_start
            return StopResult(held[:end], best_stop)
        keep = self._held_tail_len(held)
        self._held = held[len(held) - keep :] if keep else ""
        return StopResult(held[: len(held) - keep])

    def flush(self) -> str:
        """End of the sequence: release the held tail (nothing after a stop)."""
        held, self._held = self._held, ""
        return "" if self._stopped is not None else held

    def _held_tail_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        n = len(text)
        for s in self._stops:
            if len(s) - 1 <= best:
                continue  # cannot beat the tail already found
            first = s[0]
            i = text.find(first, max(0, n - len(s) + 1))
            while i != -1 and n - i > best:
                if s.startswith(text[i:]):
                    best = n - i  # the earliest start is the longest tail for this stop
                    break
                i = text.find(first, i + 1)
        return best
