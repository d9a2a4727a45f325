"""Expert-parallel load balancing (EPLB).

- `EplbConfig` / `parse_eplb_config`: vLLM's `--eplb-config` fields.
- `rebalance_experts` (policy.py): the placement policy, pure; `rank_loads`, `balancedness`.
- `ExpertMap` (expert_map.py): logical -> physical map, the router's spread over replicas.
- `ExpertLoadCounter` (load_counter.py): per-layer, per-expert token counts over a window,
  accumulated on the device.
- `rearrange_expert_weights` / `plan_moves` / `keep_in_place` (rearrange.py): in-place moves
  to a new placement, reordered within ranks so that fewer experts move.
- `exchange_expert_weights` / `plan_transfers` (exchange.py): the experts a rank gains
  arrive from other expert-parallel ranks point-to-point, then the local rearrangement.
- `EplbState` (state.py): all of it attached to a model's MoE layers, driven per step by the
  model runner; the scheduler marks the steps that rebalance (`StepRequest.rebalance_experts`).
"""

from __future__ import annotations

import importlib

from .config import EplbConfig, parse_eplb_config

_LAZY = {
    "EplbState": "state",
    "RebalanceResult": "state",
    "ExpertLoadCounter": "load_counter",
    "ExpertMap": "expert_map",
    "balancedness": "policy",
    "rank_loads": "policy",
    "rebalance_experts": "policy",
    "RearrangeStats": "rearrange",
    "keep_in_place": "rearrange",
    "plan_moves": "rearrange",
    "rearrange_expert_weights": "rearrange",
    "exchange_expert_weights": "exchange",
    "plan_transfers": "exchange",
}
"""Names imported on first use: the config module is read by the worker's flag parsing,
which must not import torch (the CPU thread binding is set before torch loads)."""


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EplbConfig", "parse_eplb_config", *_LAZY]
