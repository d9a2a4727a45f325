"""EPLB settings, with the fields and meanings of vLLM's `--eplb-config`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EplbConfig:
    """Expert-parallel load balancing: when to rebalance and how many spare expert slots."""

    window_size: int = 1000
    """Steps whose per-expert token counts the policy sees (a sliding window)."""
    step_interval: int = 3000
    """Steps between two rebalances."""
    num_redundant_experts: int = 0
    """Physical expert slots per MoE layer beyond the logical experts, for replicas."""
    log_balancedness: bool = False
    """Log the balancedness (mean / max tokens per rank) of each window at a rebalance."""

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(f"eplb window_size must be >= 1, got {self.window_size}")
        if self.step_interval < 1:
            raise ValueError(f"eplb step_interval must be >= 1, got {self.step_interval}")
        if self.num_redundant_experts < 0:
            raise ValueError(
                f"eplb num_redundant_experts must be >= 0, got {self.num_redundant_experts}"
            )
