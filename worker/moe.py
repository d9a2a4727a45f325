"""Sparse mixture-of-experts MLP: a router picks each token's top-k experts, and each expert
runs only on the tokens routed to it (`kernels.dispatch.fused_moe`).

A layer's expert weights are stacked at load time: `experts.gate_up_proj` [E, 2I, H] (each
expert's gate rows, then its up rows) and `experts.down_proj` [E, H, I], the layout and names
transformers keeps in memory, so a fused-MoE kernel reads one tensor per projection. Checkpoints
store experts one by one (`experts.N.w1.weight` for Mixtral, `experts.N.gate_proj.weight` for
Qwen3-MoE: what transformers 5 writes), or already stacked (a saved state dict);
each stacked parameter's `weight_loader` places a per-expert tensor (shard "3.gate"), or takes
the stacked one whole. A quantized checkpoint gives the experts a `MoEExpertsMethod` (from the
model's QuantConfig) that holds the stacks in the checkpoint's form (FP8 weights plus stacked
scales) and turns them into the dense stacks after loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from splitserve.kernels import dispatch
from splitserve.worker import parallel_state
from splitserve.worker.checkpoint_slices import reads_slices, whole
from splitserve.worker.linear import check_sliceable, default_weight_loader, set_weight_attrs

ExpertNames = dict[str, tuple[str, str | None]]
"""Per-expert checkpoint projection -> (stacked parameter, shard: "gate" / "up" / None)."""

MIXTRAL_EXPERT_NAMES: ExpertNames = {
    "w1": ("gate_up_proj", "gate"),
    "w3": ("gate_up_proj", "up"),
    "w2": ("down_proj", None),
}
QWEN_EXPERT_NAMES: ExpertNames = {
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
    "down_proj": ("down_proj", None),
}


def num_experts_of(config: Any) -> int:
    """The config's expert count (`num_local_experts`, or `num_experts` in older configs)."""
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0))


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (fp32), then each token's top-k.

    Args:
        router_logits: [T, E]; renormalize: rescale the k weights to sum to 1.

    Returns:
        (weights fp32 [T, K], expert ids int64 [T, K]), highest weight first.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoEExpertsMethod:
    """How MoEExperts hold their stacked weights (the quant method of the MoE layer; None on
    the experts is the plain float stacks)."""

    checkpoint_params: dict[str, str]
    """Checkpoint parameter name (weight, weight_scale, ...) -> suffix of the stacked
    parameter it loads into ("" for the weight, "_scale" ...)."""

    def create_weights(self, experts: MoEExperts) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, experts: MoEExperts) -> None:
        raise NotImplementedError


class MoEExperts(nn.Module):
    """E SwiGLU experts with stacked weights; forward runs the routed tokens through them.

    Under tensor parallelism every expert is sharded like a dense MLP: this rank holds its
    slice of each expert's intermediate features (gate / up rows, down columns), the loader
    narrows each checkpoint tensor to it, and the layer's output is a partial sum that
    `SparseMoE` reduces over the stage. A stacked tensor's attributes say how it is cut, as
    for a dense layer (`linear`): a gate / up tensor along its `output_dim` in `row_block`
    units, a down tensor along its `input_dim` in `col_block` units (no `input_dim`: it does
    not run over the intermediate features, as a per-channel scale [H, 1], and is read
    whole); a `per_shard` tensor (per-tensor scale) whole. With expert parallelism instead,
    this rank holds slots [first_expert, first_expert + num_local_experts) whole (the loader
    reads no other expert's tensors), and `expert_parallel.ep_moe` sends tokens to their
    experts' ranks; a quant method's stacks (weights and scales alike) have one entry per
    local slot along dim 0, so EPLB moves a slot's scales with its weights.
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, names: ExpertNames
    ) -> None:
        super().__init__()
        state = parallel_state.current()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.ep_size = state.ep_size
        """Ranks the experts are partitioned over (1: every rank holds every expert)."""
        self.num_physical = num_experts + state.num_redundant_experts
        """Expert slots of the layer over all ranks: the experts, plus EPLB's spare slots."""
        self.num_local_experts = parallel_state.shard_size(
            self.num_physical,
            self.ep_size,
            "the number of experts"
            + (" plus redundant experts" if state.num_redundant_experts else ""),
        )
        """Slots this rank holds (the leading axis of its stacks)."""
        self.first_expert = state.ep_rank * self.num_local_experts
        """Global index of this rank's first slot."""
        if self.num_local_experts > num_experts:
            raise ValueError(
                f"{state.num_redundant_experts} redundant experts over {self.ep_size} ranks "
                f"give each rank {self.num_local_experts} slots for {num_experts} experts: a "
                "rank would hold an expert twice; use fewer redundant experts"
            )
        self.slot_experts = [(self.first_expert + i) % num_experts for i in range(self.num_local_experts)]  # fmt: skip
        """The expert each local slot holds as loaded (slot p of the layer holds expert
        p mod num_experts: every expert once, then replicas of 0, 1, ... in the spare slots);
        EPLB moves experts between slots afterwards."""
        if self.ep_size > 1:
            self.tp_size = 1  # NOTE: experts whole, not sharded over the stage
        intermediate_size = parallel_state.shard_size(
            intermediate_size, self.tp_size, "the experts' intermediate size"
        )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.checkpoint_names = dict(names)
        self.method: MoEExpertsMethod | None = None
        local = self.num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(local, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(local, hidden_size, intermediate_size))
        self.register_stacked("gate_up_proj")
        self.register_stacked("down_proj", input_dim=1)

    def register_stacked(self, name: str, checkpoint_param: str = "weight", **attrs) -> None:
        """Give stacked parameter `name` the experts' loader; `attrs`: row_block (output rows
        per row of this tensor), output_dim (one expert's output axis, default 0), per_shard
        (one value per gate / up half), and for a down tensor input_dim (one expert's axis over
        the intermediate features; unset: read whole under tensor parallelism) and col_block
        (intermediate features per entry along it)."""
        stack = "gate_up_proj" if name.startswith("gate_up_proj") else "down_proj"
        set_weight_attrs(
            self,
            name,
            weight_loader=self.weight_loader,
            shard_ids=self.shard_ids(stack),
            checkpoint_param=checkpoint_param,
            moe_stack=stack,
            **attrs,
        )

    def set_method(self, method: MoEExpertsMethod) -> None:
        """Hold the experts as `method` says (before loading, on the meta device)."""
        check_sliceable(method, self.tp_size > 1 or self.ep_size > 1)
        for name in list(self._parameters):
            delattr(self, name)
        self.__dict__.pop("_weight_attrs", None)
        self.method = method
        method.create_weights(self)

    def process_weights_after_loading(self) -> None:
        if self.method is not None:
            self.method.process_weights_after_loading(self)

    def shard_ids(self, param_name: str) -> list[str]:
        """The per-expert pieces a stacked parameter is filled from ("3.gate", "3.up", "3")."""
        if param_name == "gate_up_proj":
            return [f"{e}.{s}" for e in range(self.num_local_experts) for s in ("gate", "up")]
        return [str(e) for e in range(self.num_local_experts)]

    def checkpoint_target(self, expert: int, proj: str, param: str) -> tuple[str, str] | None:
        """Where checkpoint tensor `experts.{expert}.{proj}.{param}` goes: (stacked parameter
        name, shard id); None for an expert another expert-parallel rank holds."""
        if proj not in self.checkpoint_names:
            raise ValueError(
                f"unknown expert projection {proj!r}; expected one of "
                f"{', '.join(self.checkpoint_names)}"
            )
        params = self.method.checkpoint_params if self.method else {"weight": ""}
        if param not in params:
            raise ValueError(f"experts have {', '.join(params)} tensors only, not {proj}.{param}")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is out of range: the config has {self.num_experts}")
        stacked, shard = self.checkpoint_names[proj]
        if expert not in self.slot_experts:
            return None
        expert = self.slot_experts.index(expert)
        return stacked + params[param], f"{expert}.{shard}" if shard else str(expert)

    @reads_slices
    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy one expert's tensor (shard "3.gate", "3.up" or "3") into its stacked slot, or
        all experts at once (shard_id None)."""
        if self.ep_size > 1 and shard_id is None:  # a whole stack: this rank's experts
            first, count = self.slot_experts[0], self.num_local_experts
            if self.slot_experts == list(range(first, first + count)):
                loaded = loaded.narrow(0, first, count)
            else:  # the slots wrap around to replicas of the first experts
                loaded = whole(loaded)[self.slot_experts]
        if self.tp_size > 1:
            loaded = self._tp_slice(param, loaded, shard_id)
        loaded = whole(loaded)
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        expert, _, half = shard_id.partition(".")
        target = param.data[int(expert)]
        if half and getattr(param, "per_shard", False):
            target = target[0 if half == "gate" else 1]
        elif half:
            rows = self.intermediate_size // getattr(param, "row_block", 1)
            # NOTE: output_dim is one expert's output axis (1 for int4 stored [in, out / 8]).
            target = target.narrow(getattr(param, "output_dim", 0), 0 if half == "gate" else rows, rows)  # fmt: skip
        if loaded.numel() == target.numel() == 1:
            loaded = loaded.reshape(target.shape)  # a scalar scale saved as [] or [1]
        if loaded.shape != target.shape:
            proj = next(p for p, (_, s) in self.checkpoint_names.items() if (s or "") == half)
            raise ValueError(
                f"expert {expert} {proj!r} {getattr(param, 'checkpoint_param', 'weight')} has "
                f"shape {tuple(loaded.shape)}, expected {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(loaded)

    def _tp_slice(self, param: torch.Tensor, loaded: torch.Tensor, shard_id) -> torch.Tensor:
        """This rank's intermediate features of a checkpoint tensor: a per-expert gate / up
        [I, H] or down [H, I] (or its scale), or a whole stack [E, 2I, H] / [E, H, I]; cut
        as the parameter's attributes say (see the class docstring)."""
        if getattr(param, "per_shard", False):
            return loaded
        gate_up = param.moe_stack == "gate_up_proj"
        if gate_up:
            dim, block = getattr(param, "output_dim", 0), getattr(param, "row_block", 1)
        else:
            dim, block = getattr(param, "input_dim", None), getattr(param, "col_block", 1)
            if dim is None:
                return loaded
        if self.intermediate_size % block:
            raise ValueError(
                f"tensor parallelism gives each of {self.tp_size} ranks "
                f"{self.intermediate_size} of the experts' intermediate features, not a whole "
                f"number of the {block}-feature blocks of their "
                f"{getattr(param, 'checkpoint_param', 'weight')}; use a --tensor-parallel-size "
                "that splits them into whole blocks (or --enable-expert-parallel)"
            )
        size = self.intermediate_size // block
        start = self.tp_rank * size
        if shard_id is None:  # a whole stack: experts lead
            dim += 1
            if gate_up:  # [E, gate rows | up rows, ...]: this rank's rows of each half
                full = loaded.shape[dim] // 2
                halves = [loaded.narrow(dim, start, size), loaded.narrow(dim, full + start, size)]
                return torch.cat(halves, dim)
        return loaded.narrow(dim, start, size)

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        apply = getattr(self.method, "apply", None)
        if apply is not None:  # a method that keeps the experts in its own form (FP8 on CUDA)
            return apply(self, x, topk_weights, topk_ids)
        return dispatch.fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


class SparseMoE(nn.Module):
    """Router (`gate`, a bias-free linear) -> softmax -> top-k -> (renormalise) -> experts."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        names: ExpertNames,
        hidden_act: str = "silu",
    ) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(
                f"unsupported hidden_act {hidden_act!r} for MoE experts; supported: silu"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, {num_experts}] (the expert count), got {top_k}"
            )
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = MoEExperts(num_experts, hidden_size, intermediate_size, names)
        self.eplb: Callable[[torch.Tensor], torch.Tensor] | None = None
        """EPLB's routing hook (`worker.eplb.state.LayerRouting`): counts the logical expert
        ids and maps them to the physical slots of the widened stacks; None without EPLB."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        if self.eplb is not None:
            ids = self.eplb(ids)
        if self.experts.ep_size > 1:
            from splitserve.worker.expert_parallel import ep_moe

            return ep_moe(self.experts, x, weights, ids)
        return parallel_state.tp_all_reduce(self.experts(x, weights, ids), self.experts.tp_size)
