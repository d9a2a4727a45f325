"""EPLB settings, with the fields and meanings of vLLM's `--eplb-config`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from splitserve.common.json_object import json_object


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
    """Log the balancedness (mean / max tokens per rank) of the window every
    `log_balancedness_interval` steps, and at each rebalance."""
    log_balancedness_interval: int = 1
    """Steps between two balancedness log lines (with log_balancedness)."""

    def __post_init__(self) -> None:
        for name in ("window_size", "step_interval", "log_balancedness_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"eplb {name} must be >= 1, got {getattr(self, name)}")
        if self.num_redundant_experts < 0:
            raise ValueError(
                f"eplb num_redundant_experts must be >= 0, got {self.num_redundant_experts}"
            )


_PINNED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_async": (
        (False,),
        "splitserve moves the experts at a step boundary, between two forward passes (the step "
        "waits for the move); set use_async to false",
    ),
    "policy": (("default",), "splitserve has the default (hierarchical) policy only"),
    "communicator": (
        (None, "torch_gloo", "torch_nccl"),
        "experts move over the stage's torch.distributed group (gloo on CPU, NCCL on CUDA)",
    ),
    "enable_migration_batching": (
        (False,),
        "migration batching belongs to vLLM's asynchronous EPLB, which splitserve does not run",
    ),
}
"""vLLM `--eplb-config` keys splitserve takes with one meaning only: allowed values, why."""


def parse_eplb_config(value: str | dict | EplbConfig | None) -> EplbConfig:
    """vLLM's `--eplb-config` (a JSON object, or the dict the in-process LLM passes) as an
    EplbConfig; ValueError naming an unknown key or a value splitserve cannot honour."""
    if value is None:
        return EplbConfig()
    if isinstance(value, EplbConfig):
        return value
    value = json_object(value, "eplb_config")
    known = {f.name for f in fields(EplbConfig)}
    kwargs = {}
    for key, item in value.items():
        if key in _PINNED:
            allowed, why = _PINNED[key]
            if item not in allowed:
                raise ValueError(f"eplb_config {key}={item!r} is not supported: {why}")
        elif key in known:
            kind = bool if key == "log_balancedness" else int
            if type(item) is not kind:
                raise ValueError(f"eplb_config {key} must be {kind.__name__}, got {item!r}")
            kwargs[key] = item
        else:
            raise ValueError(
                f"unknown eplb_config key {key!r}; known: {', '.join(sorted(known | set(_PINNED)))}"
            )
    return EplbConfig(**kwargs)
