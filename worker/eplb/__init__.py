"""Expert-parallel load balancing (EPLB), the single-process parts.

- `EplbConfig`: vLLM's `--eplb-config` fields.
- `rebalance_experts` (policy.py): the placement policy, pure; `rank_loads`, `balancedness`.
- `ExpertMap` (expert_map.py): logical -> physical map, the router's spread over replicas.
- `ExpertLoadCounter` (load_counter.py): per-layer, per-expert token counts over a window,
  accumulated on the device.
- `rearrange_expert_weights` / `plan_moves` / `keep_in_place` (rearrange.py): in-place moves
  to a new placement, reordered within ranks so that fewer experts move.
- `EplbState` (state.py): all of it attached to a model's MoE layers, driven per step.
"""

from __future__ import annotations

from .config import EplbConfig
from .expert_map import ExpertMap
from .load_counter import ExpertLoadCounter
from .policy import balancedness, rank_loads, rebalance_experts
from .rearrange import RearrangeStats, keep_in_place, plan_moves, rearrange_expert_weights
from .state import EplbState, RebalanceResult

__all__ = [
    "EplbConfig",
    "EplbState",
    "ExpertLoadCounter",
    "ExpertMap",
    "RearrangeStats",
    "RebalanceResult",
    "balancedness",
    "keep_in_place",
    "plan_moves",
    "rank_loads",
    "rearrange_expert_weights",
    "rebalance_experts",
]
