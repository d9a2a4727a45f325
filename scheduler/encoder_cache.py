"""The encoder-output cache, kept by the scheduler: which images' and audio clips' encoder
outputs the first worker rank holds, keyed by the SHA-256 of the processed input, with a
per-step encoder compute budget and a cache budget (vLLM's `max_num_encoder_input_tokens` and
`encoder_cache_size`, both in encoder output tokens, i.e. placeholder tokens).

- A step that computes any placeholder position of an item needs its encoder output. An
  output the worker holds is reused (a hit: no encoder work, whichever request brought it);
  otherwise the item is encoded in that step, which takes its tokens from the step's encoder
  budget and from the cache (evicting outputs no running request still needs, least recently
  used first). When either budget is short, the request's chunk stops before the item and the
  item waits for a later step (as vLLM cuts the chunk).
- A request holds a reference on each item until its prefill has computed past the item; an
  output without references stays cached for later requests until evicted. Evictions travel
  to the worker in the next step message (`encoder_evictions`); the worker encodes exactly the
  items it does not hold, so what it holds always matches this table.
- Preemption, finish and abort drop the request's references (a resumed request re-reads the
  cache: its items are likely still there).

`--disable-mm-preprocessor-cache` is a different cache: the tokenizer service's processed-input
cache (decoded, resized pixels by file hash). This one holds the encoder's outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

ItemSpan = tuple[int, int, bytes]
"""(offset, length, hash) of one item's placeholder tokens in the prompt."""


@dataclass(slots=True)
class _Entry:
    tokens: int
    refs: set[str] = field(default_factory=set)


class EncoderCache:
    def __init__(self, cache_size: int, budget: int) -> None:
        self.cache_size = cache_size
        """Encoder output tokens the worker may hold."""
        self.budget = budget
        """Encoder output tokens one step may compute."""
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()
        """Held outputs by item hash, least recently used first."""
        self.used = 0
        self._budget_left = budget
        self._evictions: list[bytes] = []
        self.num_queries = 0
        """Items a step needed, counted once per request and item."""
        self.num_hits = 0
        """Of those, items whose output was already held (no encoder work)."""

    def begin_step(self) -> None:
        self._budget_left = self.budget

    def fit(self, req_id: str, spans: tuple[ItemSpan, ...], start: int, n: int) -> int:
        """How many of the n tokens from `start` the request can compute this step: up to the
        first item (overlapping them) that is neither held nor fits this step's budgets. No
        side effects: `commit` does the same walk and takes what it needs."""
        chunk = _overlapping(spans, start, n)
        wanted = {h for _, _, h in chunk}
        budget, free = self._budget_left, self.cache_size - self.used
        freeable = sum(e.tokens for h, e in self.entries.items() if not e.refs and h not in wanted)
        claimed: set[bytes] = set()
        for offset, length, h in chunk:
            if h in self.entries or h in claimed:
                continue
            if length > budget or length > free + freeable:
                return max(offset - start, 0)
            budget -= length
            taken = min(length, free)
            free -= taken
            freeable -= length - taken
            claimed.add(h)
        return n

    def commit(self, req_id: str, spans: tuple[ItemSpan, ...], start: int, n: int) -> None:
        """Take what `fit(req_id, spans, start, n)` found room for (call it with its answer):
        first references on the held items (so that making room cannot evict them), then the
        new ones."""
        chunk = _overlapping(spans, start, n)
        for _, _, h in chunk:
            entry = self.entries.get(h)
            if entry is not None:
                if req_id not in entry.refs:
                    self.num_queries += 1
                    self.num_hits += 1
                    entry.refs.add(req_id)
                self.entries.move_to_end(h)
        for _, length, h in chunk:
            if h in self.entries:
                continue
            self._make_room(length)
            self.entries[h] = _Entry(length, {req_id})
            self.used += length
            self._budget_left -= length
            self.num_queries += 1

    def release_computed(self, req_id: str, spans: tuple[ItemSpan, ...], computed: int) -> None:
        """Drop the request's references on items its prefill has computed past."""
        for offset, length, h in spans:
            if offset + length < computed:
                entry = self.entries.get(h)
                if entry is not None:
                    entry.refs.discard(req_id)

    def release(self, req_id: str, spans: tuple[ItemSpan, ...]) -> None:
        """Drop every reference of the request (finished, aborted or preempted)."""
        for _, _, h in spans:
            entry = self.entries.get(h)
            if entry is not None:
                entry.refs.discard(req_id)

    def take_evictions(self) -> list[bytes]:
        """Hashes evicted since the last call, for the next step message."""
        out, self._evictions = self._evictions, []
        return out

    @property
    def usage(self) -> float:
        return self.used / self.cache_size if self.cache_size else 0.0

    def _make_room(self, tokens: int) -> None:
        for h in [h for h, e in self.entries.items() if not e.refs]:
            if self.used + tokens <= self.cache_size:
                break
            self.used -= self.entries.pop(h).tokens
            self._evictions.append(h)
        if self.used + tokens > self.cache_size:  # `fit` checked the room first
            raise RuntimeError(
                f"encoder cache: no room for {tokens} tokens ({self.used} of "
                f"{self.cache_size} held by running requests)"
            )


def _overlapping(spans: tuple[ItemSpan, ...], start: int, n: int) -> list[ItemSpan]:
    """The items with a placeholder position in [start, start + n)."""
    return [s for s in spans if s[0] < start + n and s[0] + s[1] > start]
