"""Which part of the model this process holds, and the process groups its layers talk to.

A worker is one cell of a grid: pipeline stage `pp_rank` of `pp_size` (a slice of the decoder
layers) and tensor-parallel rank `tp_rank` of `tp_size` within that stage (a slice of every
layer's heads, intermediate features, experts and vocabulary). With expert parallelism the
same ranks form the expert-parallel group (`ep_rank` of `ep_size`), each holding whole
experts. `ParallelState` names the cell;
the model is built under `use(state)`, and its layers read `current()` at construction to size
their shards, so model files need no extra constructor arguments for tensor parallelism. A model
built outside `use` (a test, a model file that predates this) sees the single-rank default.

The torch.distributed groups are made once per process, after the weights load
(`stage_transfer.StageLink`); `set_tp_group` records this stage's group here, and the
collectives below use it. With one rank they return their input untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelState:
    """One worker's place in the pipeline x tensor-parallel grid."""

    start_layer: int = 0
    """First decoder layer of this pipeline stage."""
    end_layer: int = 0
    """One past the last decoder layer of this stage (0 with the default: set by the loader)."""
    pp_rank: int = 0
    """Pipeline stage of this worker."""
    pp_size: int = 1
    """Number of pipeline stages."""
    tp_rank: int = 0
    """Rank within the stage's tensor-parallel group (0 is the stage's driver)."""
    tp_size: int = 1
    """Number of tensor-parallel ranks per stage."""
    enable_expert_parallel: bool = False
    """MoE experts are partitioned over the stage's ranks instead of each one sharded."""
    num_redundant_experts: int = 0
    """EPLB's spare expert slots per MoE layer: with expert parallelism each rank holds
    (experts + this) / ep_size slots (physical experts), any of which may hold any expert."""

    def __post_init__(self) -> None:
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp_rank must be in [0, {self.pp_size}), got {self.pp_rank}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank}")
        if self.num_redundant_experts and not self.enable_expert_parallel:
            raise ValueError("redundant expert slots need expert parallelism")

    @property
    def is_first(self) -> bool:
        """Whether this stage owns the token embedding."""
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        """Whether this stage owns the final norm and lm_head."""
        return self.pp_rank == self.pp_size - 1

    @property
    def ep_size(self) -> int:
        """Ranks each MoE layer's experts are partitioned over: the stage's tensor-parallel
        group with --enable-expert-parallel, else 1 (every rank holds a slice of every
        expert)."""
        return self.tp_size if self.enable_expert_parallel else 1

    @property
    def ep_rank(self) -> int:
        """This rank's place in the expert-parallel group (its tensor-parallel rank)."""
        return self.tp_rank if self.enable_expert_parallel else 0

    @classmethod
    def from_stage_args(
        cls, start_layer: int, end_layer: int, is_first: bool, is_last: bool
    ) -> ParallelState:
        """The state a model constructor's older positional stage arguments describe (one
        tensor-parallel rank; the pipeline position only as first / last)."""
        pp_size = 1 if is_first and is_last else 3 if not (is_first or is_last) else 2
        pp_rank = 0 if is_first else pp_size - 1 if is_last else 1
        return cls(start_layer, end_layer, pp_rank, pp_size, *_current_tp())


def stage_arguments(first, rest: tuple) -> tuple[ParallelState, int]:
    """(state, max_positions) from a model constructor's arguments after the config: the
    current form (state, max_positions), or the older positional one (start_layer, end_layer,
    is_first, is_last, max_positions) that model files written before it still pass."""
    if isinstance(first, ParallelState):
        if len(rest) != 1:
            raise TypeError("expected (config, parallel_state, max_positions)")
        return first, int(rest[0])
    if len(rest) != 4:
        raise TypeError(
            "expected (config, parallel_state, max_positions) or "
            "(config, start_layer, end_layer, is_first, is_last, max_positions)"
        )
    end, is_first, is_last, max_positions = rest
    return ParallelState.from_stage_args(int(first), int(end), is_first, is_last), max_positions


def _current_tp() -> tuple[int, int]:
    state = current()
    return state.tp_rank, state.tp_size


_CURRENT = ParallelState()
_TP_GROUP = None
_TP_DRIVER = 0


def current() -> ParallelState:
    """The state the model being built belongs to (single-rank outside `use`)."""
    return _CURRENT


@contextlib.contextmanager
def use(state: ParallelState) -> Iterator[ParallelState]:
    """Build a model for `state`: layers read it through `current()`."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, state
    try:
        yield state
    finally:
        _CURRENT = previous


def set_tp_group(group, driver_rank: int) -> None:
    """Record this process's tensor-parallel group and its driver's global rank."""
    global _TP_GROUP, _TP_DRIVER
    _TP_GROUP, _TP_DRIVER = group, driver_rank


def tp_group():
    """This process's tensor-parallel group (None until set, or with one rank)."""
    return _TP_GROUP


def tp_driver_rank() -> int:
    """Global rank of this stage's driver."""
    return _TP_DRIVER


def tp_all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Sum `x` over the stage's ranks, in place; `x` itself with one rank."""
    if tp_size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=_require_group())
    return x


def tp_broadcast_from_driver(x: torch.Tensor) -> torch.Tensor:
    """The driver's `x` on every rank of the stage (filled in place)."""
    import torch.distributed as dist

    dist.broadcast(x, _TP_DRIVER, group=_require_group())
    return x


def tp_gather_to_driver(x: torch.Tensor, tp_size: int) -> torch.Tensor | None:
    """Concatenate every rank's `x` [N, C] along the last axis on the driver ([N, C * T]);
    None on the other ranks. `x` itself with one rank."""
    if tp_size == 1:
        return x
    import torch.distributed as dist

    group = _require_group()
    x = x.contiguous()
    if dist.get_rank() != _TP_DRIVER:
        dist.gather(x, None, dst=_TP_DRIVER, group=group)
        return None
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.gather(x, parts, dst=_TP_DRIVER, group=group)
    return torch.cat(parts, dim=-1)


def _require_group():
    if _TP_GROUP is None:
        raise RuntimeError(
            "a tensor-parallel layer ran before this worker joined its tensor-parallel group"
        )
    return _TP_GROUP


def shard_size(total: int, tp_size: int, what: str) -> int:
    """`total / tp_size`; ValueError naming `what` when it does not divide."""
    if total % tp_size:
        raise ValueError(f"{what} ({total}) is not divisible by --tensor-parallel-size {tp_size}")
    return total // tp_size
