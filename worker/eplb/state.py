"""EPLB on one process: the MoE layers' counters, map and rearrangement, driven step by step.

`EplbState.attach(model, config)` finds the model's `SparseMoE` layers, widens each layer's
expert stacks from E logical experts to P = E + num_redundant_experts physical slots (the
initial placement: expert e in slot e, spare slots replicas of 0, 1, ...), and installs a
routing hook that counts each forward's logical experts (device-side) and maps them to
physical slots, spreading a replicated expert's pairs over its replicas. The model runner
calls `step()` at every step boundary; every `step_interval` steps it rebalances: the policy
places the window's load, each layer whose busiest rank it lightens moves its stacks in place
to the new placement, and the map follows. Call `attach` after loading and before capturing CUDA graphs (the stacks are new
tensors; the map and counters keep their addresses afterwards).

`num_ranks` is the expert-parallel size the placement is balanced for. With expert parallelism
(the layers' experts have `ep_size` > 1) the stacks were built with this rank's slots of the
physical placement already (`moe.MoEExperts.slot_experts`), every rank of the stage holds one
EplbState over the same layers, and a rebalance is collective: the driver's window load is
broadcast so every rank places the same, and the weights move between ranks
(`exchange.exchange_expert_weights`). Every rank sees every token's routing (the MoE input is
the same on all of them), so the counters agree anyway; the broadcast makes it certain. Without
expert parallelism every slot lives in this process (EP = 1, or ranks simulated for the policy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from splitserve.common import messages as msg
from splitserve.worker import parallel_state
from splitserve.worker.moe import SparseMoE, num_experts_of

from .config import EplbConfig
from .exchange import exchange_expert_weights
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
    received: int = 0
    """Experts this process received from other expert-parallel ranks, all layers."""


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
        self.num_experts = self._check_layers()
        experts = layers[0].experts
        self.ep_size, self.ep_rank = experts.ep_size, experts.first_expert // experts.num_local_experts  # fmt: skip
        """Expert-parallel ranks the slots live on, and this process's (1 and 0: all here)."""
        if self.ep_size > 1:
            num_ranks = self.ep_size
            if experts.num_physical != self.num_experts + config.num_redundant_experts:
                raise ValueError(
                    f"the MoE layers were built with {experts.num_physical} expert slots, EPLB "
                    f"is configured for {self.num_experts + config.num_redundant_experts}"
                )
        self.num_ranks, self.num_groups, self.num_nodes = num_ranks, num_groups, num_nodes
        self.num_physical = self.num_experts + config.num_redundant_experts
        if self.num_physical % num_ranks:
            raise ValueError(
                f"{self.num_experts} experts + {config.num_redundant_experts} redundant = "
                f"{self.num_physical} slots do not divide over {num_ranks} ranks"
            )
        self.num_rebalances = 0
        self._init_tensors()

    @classmethod
    def for_stage(cls, model: nn.Module, config: EplbConfig, hf_config) -> EplbState | None:
        """The state over a pipeline stage's MoE layers (--enable-eplb); None for a stage that
        holds none of a mixture-of-experts model's MoE layers (it ignores the rebalances).
        ValueError for a model without experts."""
        if any(isinstance(m, SparseMoE) for m in model.modules()):
            return cls.attach(model, config)
        if not num_experts_of(hf_config.get_text_config()):
            raise ValueError(
                "--enable-eplb balances the experts of a mixture-of-experts model; this model "
                "has none"
            )
        return None

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
            if self.ep_size > 1:  # built with this rank's slots of the initial placement
                mine = slots[
                    experts.first_expert : experts.first_expert + experts.num_local_experts
                ]
                if mine.tolist() != experts.slot_experts:
                    raise ValueError(f"MoE layer {index}: its slots do not hold {mine.tolist()}")
            else:
                for name, param in list(experts.named_parameters(recurse=False)):
                    if param.shape[0] == self.num_experts:
                        wide = nn.Parameter(param.data[slots].contiguous(), requires_grad=False)
                        setattr(experts, name, wide)
            layer.eplb = LayerRouting(self, index)

    @property
    def local_slots(self) -> int:
        """Slots each process holds: all of them without expert parallelism."""
        return self.num_physical // self.ep_size

    def stacks(self, layer: int) -> list[torch.Tensor]:
        """This process's per-slot tensors of a layer's experts (weights, and scales where
        held)."""
        experts = self.layers[layer].experts
        params = experts.parameters(recurse=False)
        return [p.data for p in params if p.shape[0] == self.local_slots]

    def end_step(self) -> None:
        """A forward pass ended (the model runner): its counts close a step of the window;
        with log_balancedness, every log_balancedness_interval steps the window is logged."""
        self.counter.advance()
        config = self.config
        if config.log_balancedness and self.counter.steps % config.log_balancedness_interval == 0:
            self.log_window()

    def rebalance_report(self) -> msg.EplbReport:
        """Rebalance now (the scheduler's signal) and report it as a StepResult carries it."""
        done = self.rebalance()
        return msg.EplbReport(
            self.num_rebalances,
            done.balancedness_before,
            done.balancedness_after,
            done.changed_layers,
            done.received,
        )

    def step(self) -> RebalanceResult | None:
        """A step boundary: close the step's counts; rebalance every step_interval steps."""
        self.end_step()
        if self.counter.steps % self.config.step_interval == 0:
            return self.rebalance()
        return None

    def balancedness(self, load: torch.Tensor | None = None) -> float:
        """Mean / max tokens per rank of the window (or `load` [L, E]) under the current
        placement, averaged over layers."""
        load = self.counter.window_load() if load is None else load
        return balancedness(rank_loads(self.map.phy2log.cpu(), load, self.num_ranks))

    def rebalance(self, load: torch.Tensor | None = None) -> RebalanceResult:
        """Place the window's load (or `load` [L, E]) and move every layer's experts there;
        with expert parallelism every rank of the stage calls it at the same step boundary."""
        load = self.counter.window_load() if load is None else load.cpu()
        if self.ep_size > 1:  # the driver's counts, so that every rank places alike
            load = parallel_state.tp_broadcast_from_driver(load.to(self.map.phy2log.device))
            load = load.cpu()
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
        # NOTE: the policy is greedy, so its placement can be no better than the one in use;
        # a layer moves only when its busiest rank gets lighter (the mean is the same).
        worse = (
            rank_loads(new, load, self.num_ranks).max(-1).values
            >= rank_loads(old, load, self.num_ranks).max(-1).values
        )
        new[worse] = old[worse]
        changed = copies = peak = received = 0
        for layer in range(len(self.layers)):
            if torch.equal(old[layer], new[layer]):
                continue
            if self.ep_size > 1:
                stats, gained = exchange_expert_weights(
                    self.stacks(layer),
                    old[layer].tolist(),
                    new[layer].tolist(),
                    self.ep_rank,
                    self.ep_size,
                    parallel_state.tp_group(),
                )
                self._sync_slot_experts(layer, new[layer].tolist())
                received += gained
            else:
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
        result = RebalanceResult(before, after, changed, copies, peak, received)
        # NOTE: rare (every step_interval steps), so logged whatever log_balancedness says.
        logger.info(
            "EPLB rebalance %d: balancedness %.3f -> %.3f, %d layers moved (%d copies, "
            "%d experts received from other ranks)",
            self.num_rebalances, before, after, changed, copies, received,
        )  # fmt: skip
        return result

    def _sync_slot_experts(self, layer: int, placement: list[int]) -> None:
        experts = self.layers[layer].experts
        first = experts.first_expert
        experts.slot_experts = placement[first : first + experts.num_local_experts]

    def log_window(self) -> None:
        """Log the window's balancedness under the current placement (log_balancedness)."""
        logger.info(
            "EPLB: balancedness %.3f (mean / max tokens per rank over the last %d steps), "
            "%d rebalances so far",
            self.balancedness(),
            min(self.counter.steps, self.config.window_size),
            self.num_rebalances,
        )
