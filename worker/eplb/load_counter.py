"""Per-layer, per-expert token counts of the MoE layers over a sliding window of steps.

Counts are kept per logical expert, so a window survives a rearrangement (the slots change
meaning, the experts do not); per-rank loads follow from the placement (`policy.rank_loads`).
Every MoE forward adds its routed (token, expert) pairs into a device accumulator [L, E] with a
scatter-add (no host sync, a fixed address: graph-safe). At each step boundary `advance`
moves the accumulator into a ring of `window_size` steps; `window_load` sums the ring (the
only place that reads counts back to the host, on demand).
"""

from __future__ import annotations

import torch


class ExpertLoadCounter:
    """Tokens per (layer, logical expert), over the last `window_size` completed steps."""

    def __init__(self, num_layers: int, num_experts: int, window_size: int, device=None) -> None:
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.window_size = window_size
        self.current = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.ring = torch.zeros(
            window_size, num_layers, num_experts, dtype=torch.int64, device=device
        )
        self.cursor = 0
        self.steps = 0

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count a forward's routed pairs (logical expert ids, any shape) for `layer`."""
        flat = topk_ids.reshape(-1).to(torch.int64)
        self.current[layer].scatter_add_(0, flat, torch.ones_like(flat))

    def advance(self) -> None:
        """Close the step: its counts replace the oldest step of the window."""
        self.ring[self.cursor].copy_(self.current)
        self.current.zero_()
        self.cursor = (self.cursor + 1) % self.window_size
        self.steps += 1

    def window_load(self) -> torch.Tensor:
        """[L, E] tokens per expert over the window (steps closed by `advance`), on the host."""
        return self.ring.sum(dim=0).cpu()

    def reset(self) -> None:
        """Forget every count (and the steps so far)."""
        self.current.zero_()
        self.ring.zero_()
        self.cursor = self.steps = 0
