"""Tokens per engine step as a histogram (vLLM's `vllm:iteration_tokens_total`).

The step loop adds one observation per step: a bisect and two integer increments. The gateway
reads the buckets through GetStats and renders them as a Prometheus histogram.
"""

from __future__ import annotations

import bisect

# vLLM's bucket bounds for tokens per step.
STEP_TOKEN_BOUNDS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class StepTokenHistogram:
    """Per-bucket step counts (not cumulative) and the token sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[int, ...] = STEP_TOKEN_BOUNDS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bucket bounds must be strictly increasing, got {bounds}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        """One per bound, then the +Inf bucket."""
        self.total = 0

    def observe(self, num_tokens: int) -> None:
        # bisect_left: a step of exactly `bound` tokens falls in that bound's bucket (le).
        self.counts[bisect.bisect_left(self.bounds, num_tokens)] += 1
        self.total += num_tokens

    def cumulative(self) -> list[int]:
        """Prometheus' view: steps with at most each bound, the last for +Inf."""
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out
