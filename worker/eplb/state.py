"""EPLB on one process: the MoE layers' counters, map and rearrangement, driven step by step.

`EplbState.attach(model, config)` finds the model's `SparseMoE` layers, widens each layer's
expert stacks from E logical experts to P = E + num_redundant_experts physical slots (the
initial placement: expert e in slot e, spare slots replicas of 0, 1, ...), and installs a
routing hook that counts each forward's logical experts (device-side) and maps them to
physical slots, spreading a replicated expert's pairs over its replicas. The model runner
calls `step()` at every step boundary; every `step_interval` steps it rebalances: the policy
places the window's load, each layer's stacks move in place to the new placement, and the map
follows. Call `attach` after loading and before capturing CUDA graphs (the stacks are new
tensors; the map and counters keep their addresses afterwards).

`num_ranks` is the expert-parallel size the placement is balanced for. Here every slot lives
in this process (EP = 1, or ranks simulated for the policy); moving weights across ranks is the
expert-parallel worker's part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from splitserve.worker.moe import SparseMoE

from .config import EplbConfig
from .expert_map import ExpertMap
from .load_counter import ExpertLoadCounter
from .policy import balancedness, rank_loads, rebalance_experts
from .rearrange import keep_in_place, rearrange_expert_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceResult:
    """One rebalance: the window's balancedness under the old and the new placement."""

    balancedness_before: float
    balancedness_after: float
    changed_layers: int
    """Layers whose placement changed."""
    copies: int
    """Expert copies made, all layers."""
    peak_buffers: int
    """Scratch expert buffers held at once (the extra memory of the move), at most."""


class LayerRouting:
    """The hook a SparseMoE calls on its top-k ids: count them, return physical slots."""

    def __init__(self, state: EplbState, layer: int) -> None:
        self.state, self.layer = state, layer

    def __call__(self, topk_ids: torch.Tensor) -> torch.Tensor:
        self.state.counter.record(self.layer, topk_ids)
        return self.state.map.to_physical(self.layer, topk_ids)


class EplbState:
    """Counters, placement and rearrangement of every MoE layer of one process."""

    def __init__(
        self,
        layers: list[SparseMoE],
        config: EplbConfig,
        num_ranks: int = 1,
        num_groups: int = 1,
        num_nodes: int = 1,
    ) -> None:
        self.layers, self.config = layers, config
        self.num_ranks, self.num_groups, self.num_nodes = num_ranks, num_groups, num_nodes
        self.num_experts = self._check_layers()
        self.num_physical = self.num_experts + config.num_redundant_experts
        if self.num_physical % num_ranks:
            raise ValueError(
                f"{self.num_experts} experts + {config.num_redundant_experts} redundant = "
                f"{self.num_physical} slots do not divide over {num_ranks} ranks"
            )
        self.steps = 0
        self.num_rebalances = 0
        self.last_balancedness: float | None = None
        self._init_tensors()

    @classmethod
    def attach(cls, model: nn.Module, config: EplbConfig, **kwargs) -> EplbState:
        """Balance every SparseMoE layer of `model` (in module order); kwargs: num_ranks,
        num_groups, num_nodes."""
        layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
        if not layers:
            raise ValueError("EPLB needs a model with MoE layers; this one has none")
        return cls(layers, config, **kwargs)

    def _check_layers(self) -> int:
        counts = {layer.experts.num_experts for layer in self.layers}
        if len(counts) != 1:
            raise ValueError(f"EPLB needs one expert count in every layer, got {sorted(counts)}")
        for layer in self.layers:
            if layer.eplb is not None:
                raise ValueError("the model's MoE layers are already under EPLB")
        return counts.pop()

    def _init_tensors(self) -> None:
        device = self.layers[0].gate.weight.device
        num_layers = len(self.layers)
        self.map = ExpertMap.initial(num_layers, self.num_experts, self.num_physical, device)
        self.counter = ExpertLoadCounter(
            num_layers, self.num_experts, self.config.window_size, device
        )
        for index, layer in enumerate(self.layers):
            slots = self.map.phy2log[index]
            experts = layer.experts
            for name, param in list(experts.named_parameters(recurse=False)):
                if param.shape[0] == self.num_experts:
                    wide = nn.Parameter(param.data[slots].contiguous(), requires_grad=False)
                    setattr(experts, name, wide)
            layer.eplb = LayerRouting(self, index)

    def stacks(self, layer: int) -> list[torch.Tensor]:
        """The per-slot tensors of a layer's experts (weights, and scales where held)."""
        experts = self.layers[layer].experts
        params = experts.parameters(recurse=False)
        return [p.data for p in params if p.shape[0] == self.num_physical]

    def step(self) -> RebalanceResult | None:
        """A step boundary: close the step's counts; rebalance every step_interval steps."""
        self.counter.advance()
        self.steps += 1
        if self.steps % self.config.step_interval == 0:
            return self.rebalance()
        return None

    def balancedness(self, load: torch.Tensor | None = None) -> float:
        """Mean / max tokens per rank of the window (or `load` [L, E]) under the current
        placement, averaged over layers."""
        load = self.counter.window_load() if load is None else load
        return balancedness(rank_loads(self.map.phy2log.cpu(), load, self.num_ranks))

    def rebalance(self, load: torch.Tensor | None = None) -> RebalanceResult:
        """Place the window's load (or `load` [L, E]) and move every layer's experts there."""
        load = self.counter.window_load() if load is None else load.cpu()
        before = self.balancedness(load)
        if not load.any():  # no traffic in the window: nothing to balance, nothing to move
            return RebalanceResult(before, before, 0, 0, 0)
        new = rebalance_experts(
            load, self.num_physical, self.num_ranks, self.num_groups, self.num_nodes
        )
        old = self.map.phy2log.cpu()
        slots_per_rank = self.num_physical // self.num_ranks
        for layer in range(len(self.layers)):
            kept = keep_in_place(old[layer].tolist(), new[layer].tolist(), slots_per_rank)
            new[layer] = torch.tensor(kept, dtype=new.dtype)
        changed = copies = peak = 0
        for layer in range(len(self.layers)):
            if torch.equal(old[layer], new[layer]):
                continue
            stats = rearrange_expert_weights(
                self.stacks(layer), old[layer].tolist(), new[layer].tolist()
            )
            changed, copies, peak = (
                changed + 1,
                copies + stats.copies,
                max(peak, stats.peak_buffers),
            )
        self.map.update(new.to(self.map.phy2log.device))
        after = self.balancedness(load)
        self.num_rebalances += 1
        self.last_balancedness = after
        if self.config.log_balancedness:
            logger.info(
                "EPLB rebalance %d: balancedness %.3f -> %.3f, %d layers moved (%d copies)",
                self.num_rebalances, before, after, changed, copies,
            )  # fmt: skip
        return RebalanceResult(before, after, changed, copies, peak)

    def metrics(self) -> dict[str, float]:
        """Rebalances performed and the last window's balancedness (for the metrics owner)."""
        return {
            "eplb_num_rebalances": float(self.num_rebalances),
            "eplb_balancedness": float(self.last_balancedness or 0.0),
        }
