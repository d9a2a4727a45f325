"""Weight-only int4 (W4A16) layers: what AWQ (awq.py) and compressed-tensors `pack-quantized`
(compressed_tensors.py) share once their checkpoint tensors are unpacked.

A format's method registers the checkpoint's own packed tensors (`create_weights`) and turns
them into one canonical form (`unpack`): unsigned 4-bit values q [N, K] in 0..15, zero points
[N, G] in 0..15 (8 for a symmetric format) and scales [N, G], G = K / group; the real weight is
(q[n, k] - zeros[n, k // group]) * scales[n, k // group], computed in fp32.

On CUDA (with triton) the weight stays int4: it is repacked along K into int32 [K / 8, N] with
scales and zeros [G, N] in the compute dtype, the layout `kernels.w4a16_gemm` reads with
coalesced loads, and every projection runs that W4A16 GEMM (`kernels.dispatch.w4a16_linear`).
On CPU the weight is dequantized to the compute dtype once, in `process_weights_after_loading`,
and the layer then runs as an unquantized one (oneDNN included): weight-only, activations are
never quantized, so the CPU model equals the model on its dequantized weights.

Memory trade-off of dequantizing once at load: a CPU worker holds dense weights, 4 bytes per
parameter in fp32 (8x the int4 checkpoint's half byte, plus its scales), 2 in bf16, and each
step runs at the unquantized model's speed. Dequantizing per layer on every forward would keep
the packed bytes (about 0.53 bytes per parameter at group 128) but unpack and rescale every
weight each step, which costs more than the GEMM itself at decode shapes, plus a transient
dense copy of the largest layer. Serving int4 on CPU is about loading AWQ / W4A16 checkpoints,
not about saving memory. While loading, the packed tensors of a layer and its dense copy coexist
only for that layer.

MoE experts (`Int4MoEMethod`) load the same per-layer tensors per expert, stacked, and are
dequantized to the dense stacks at load on every device, CUDA included: the fused-MoE kernels
read dense stacks, so an int4 MoE model takes the dense model's memory there too.

Under tensor parallelism a format's tensors carry the attributes the sliced layers cut by
(`linear`, `parallel_layers.RowParallelLinear`, `moe.MoEExperts`): `output_dim` / `row_block`
for the output axis (8 outputs per entry where the outputs are packed), `input_dim` /
`col_block` for the input axis (8 inputs per entry where the inputs are packed, the group size
for scales and zero points; a per-channel scale has no input axis and is read whole). A rank's
slice must be whole packs and whole groups (`check_whole_blocks`, `check_expert_blocks`, shared
with FP8's block scales); anything else is refused at start-up. Under expert parallelism every
stack has one entry per local slot, as the dense stacks it becomes (which EPLB moves).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from splitserve.kernels import dispatch
from splitserve.kernels.reference import int4_pack_k, w4a16_dequantize_ref
from splitserve.worker.linear import Linear, LinearMethod, UnquantizedLinearMethod
from splitserve.worker.moe import MoEExperts, MoEExpertsMethod
from splitserve.worker.parallel_layers import RowParallelLinear
from splitserve.worker.quantization.fp8 import check_expert_blocks, check_whole_blocks

PACK = 8
"""4-bit values per int32."""

_DENSE = UnquantizedLinearMethod()
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int32(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, 8C] in 0..15, unpacking along the last dim: nibble i (bits
    4i..4i+3) of word c is element 8c + order[i] (order None: element 8c + i)."""
    nibbles = (packed[..., None] >> _SHIFTS.to(packed.device)) & 0xF  # [R, C, 8]
    if order is not None:
        placed = torch.empty_like(nibbles)
        placed[..., list(order)] = nibbles
        nibbles = placed
    return nibbles.reshape(*packed.shape[:-1], packed.shape[-1] * PACK)


def pack_int32(values: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of `unpack_int32`: int [R, 8C] in 0..15 -> int32 [R, C]."""
    grouped = values.to(torch.int32).reshape(*values.shape[:-1], -1, PACK)
    if order is not None:
        grouped = grouped[..., list(order)]
    out = torch.zeros(grouped.shape[:-1], dtype=torch.int32, device=values.device)
    for i in range(PACK):
        out |= grouped[..., i] << (4 * i)
    return out


def check_layer(in_features: int, shard_sizes: dict[str | None, int], group: int) -> None:
    """ValueError unless the input dim and every (fused) output size pack into whole int32
    words and the group divides the input dim."""
    if in_features % PACK:
        raise ValueError(
            f"the input dim {in_features} of the layer is not a multiple of {PACK} (int4 packs "
            "8 per int32)"
        )
    if group <= 0 or in_features % group:
        raise ValueError(
            f"group_size {group} does not divide the input dim {in_features} of the layer"
        )
    for shard, size in shard_sizes.items():
        if size % PACK:
            what = f"shard {shard!r}" if shard else "the layer"
            raise ValueError(
                f"{what} has {size} outputs, not a multiple of {PACK} (int4 packs 8 per int32)"
            )


def keeps_packed(t: torch.Tensor) -> bool:
    """Whether a layer whose weights are on t's device keeps them int4 for the Triton GEMM
    (CUDA with triton), rather than dequantizing them once."""
    return t.is_cuda and dispatch.triton_available()


def dequantize(q, zeros, scales, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] of the canonical form (see the module)."""
    return w4a16_dequantize_ref(int4_pack_k(q), scales.t(), zeros.t(), group, dtype)


def _check_finite(scales: torch.Tensor, where: str) -> None:
    if not torch.isfinite(scales).all():
        raise ValueError(f"{where}: its int4 scales hold non-finite values (a corrupt checkpoint?)")


TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype, dict[str, Any]]]
"""Checkpoint tensor name -> (shape, dtype, weight-loader attributes)."""


class Int4LinearMethod(LinearMethod):
    """The shared weights, post-load step and forward of the W4A16 formats; a format says which
    tensors it stores (`tensor_specs`) and how they unpack (`unpack`)."""

    checkpoint_params: tuple[str, ...] = ()
    """The tensors `tensor_specs` names (dropped after unpacking)."""

    supports_tensor_parallel = True

    def input_group(self) -> int | None:
        """The checkpoint's group size along the inputs; None: one group a row (per channel,
        whatever part of the row a rank holds)."""
        raise NotImplementedError

    def group_for(self, in_features: int) -> int:
        """The group size along the input dim of a layer with `in_features` inputs."""
        return self.input_group() or in_features

    def slice_block(self) -> tuple[int, str]:
        """(input features a rank's slice must hold whole multiples of: the pack and the
        group, the layout named for the refusal)."""
        group = self.input_group()
        if group is None:
            return PACK, f"int4 per channel ({PACK} values per int32)"
        return math.lcm(PACK, group), f"int4 group_size {group} ({PACK} values per int32)"

    def tensor_specs(
        self, in_features: int, out_features: int, shards: dict[str, int] | None
    ) -> TensorSpecs:
        """The checkpoint tensors of one layer (`shards`: a fused layer's output sizes)."""
        raise NotImplementedError

    def unpack(
        self,
        tensors: dict[str, torch.Tensor],
        shards: dict[str | None, int],
        in_features: int,
        where: str,
        row_sources: dict[str, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q int [N, K] 0..15, zeros int [N, G] 0..15, scales float [N, G]) of one layer's
        loaded tensors (this rank's slice of them); `where` names it in errors. A shape the
        checkpoint states is checked against `in_features`, the checkpoint layer's inputs,
        and per output shard its size, or, for a shard in `row_sources` (its first row on
        this rank), as holding this rank's rows."""
        raise NotImplementedError

    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool):
        shards = getattr(layer, "shard_sizes", None)
        if layer.tp_sharded:
            block, what = self.slice_block()
            check_whole_blocks(layer, PACK, block, what)
        group = self.group_for(in_features)
        check_layer(in_features, shards or {None: out_features}, group)
        layer.compute_dtype = torch.get_default_dtype()
        layer.onednn = False
        layer.int4_group = group
        specs = self.tensor_specs(in_features, out_features, shards)
        for name, (shape, dtype, attrs) in specs.items():
            setattr(layer, name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
            layer.register_weight(name, **attrs)
        layer.create_bias(bias)

    def process_weights_after_loading(self, layer: Linear) -> None:
        where = f"layer ({layer.extra_repr()})"
        tensors = {name: getattr(layer, name).detach() for name in self.checkpoint_params}
        shards = getattr(layer, "shard_sizes", None) or {None: layer.out_features}
        inputs = layer.in_features
        if isinstance(layer, RowParallelLinear):
            inputs *= layer.tp_size
        sources = getattr(layer, "shard_sources", None)
        q, zeros, scales = self.unpack(tensors, shards, inputs, where, sources)
        _check_finite(scales, where)
        for name in self.checkpoint_params:
            delattr(layer, name)
        group, dtype = layer.int4_group, layer.compute_dtype
        layer.int4_dense = not keeps_packed(q)
        if layer.int4_dense:
            dense = dequantize(q, zeros, scales, group, dtype)
            layer.weight = nn.Parameter(dense, requires_grad=False)
            _DENSE.process_weights_after_loading(layer)  # oneDNN on CPU float32, as unquantized
            return
        layer.int4_qweight = nn.Parameter(int4_pack_k(q), requires_grad=False)
        layer.int4_scales = nn.Parameter(scales.t().to(dtype).contiguous(), requires_grad=False)
        layer.int4_zeros = nn.Parameter(zeros.t().to(dtype).contiguous(), requires_grad=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.int4_dense:
            return _DENSE.apply(layer, x)
        return dispatch.w4a16_linear(
            x, layer.int4_qweight, layer.int4_scales, layer.int4_zeros, layer.int4_group,
            layer.bias,
        )  # fmt: skip


class Int4MoEMethod(MoEExpertsMethod):
    """int4 experts as the format stores them (per expert the tensors of `method`, stacked:
    `gate_up_proj_qweight` [E, ...]), dequantized to the dense stacks at load on every device:
    the fused-MoE paths read dense stacks (an int4 grouped GEMM is a later slice), so an int4
    MoE checkpoint loads and computes as its dequantized model but takes the dense model's
    memory.

    Under tensor parallelism each rank reads its rows of every expert's gate / up tensors and
    its columns of down's (whole packs and groups, else refused); under expert parallelism
    every stack holds this rank's slots along dim 0."""

    supports_tensor_parallel = True

    def __init__(self, method: Int4LinearMethod) -> None:
        self.method = method
        self.checkpoint_params = {name: "_" + name for name in method.checkpoint_params}

    @staticmethod
    def _stacks(experts: MoEExperts) -> dict[str, tuple[int, dict[str | None, int]]]:
        """Stack -> (one expert's input dim, its output shards)."""
        hidden, inter = experts.hidden_size, experts.intermediate_size
        return {
            "gate_up_proj": (hidden, {"gate": inter, "up": inter}),
            "down_proj": (inter, {None: hidden}),
        }

    @staticmethod
    def _checkpoint_layout(
        experts: MoEExperts, stack: str, k: int
    ) -> tuple[int, dict[str, int] | None]:
        """(one checkpoint expert's inputs of `stack`, this rank's first gate / up rows or
        None): what `Int4LinearMethod.unpack` checks stated shapes against."""
        if experts.tp_size == 1:
            return k, None
        if stack == "down_proj":
            return k * experts.tp_size, None
        first = experts.tp_rank * experts.intermediate_size
        return k, {"gate": first, "up": first}

    def create_weights(self, experts: MoEExperts) -> None:
        experts.compute_dtype = torch.get_default_dtype()
        if experts.tp_size > 1:
            block, what = self.method.slice_block()
            check_expert_blocks(experts, PACK, block, what)
        for stack, (k, shards) in self._stacks(experts).items():
            check_layer(k, shards, self.method.group_for(k))
            merged = None if None in shards else shards
            specs = self.method.tensor_specs(k, sum(shards.values()), merged)
            for name, (shape, dtype, attrs) in specs.items():
                stacked = torch.empty(experts.num_local_experts, *shape, dtype=dtype)
                setattr(experts, f"{stack}_{name}", nn.Parameter(stacked, requires_grad=False))
                experts.register_stacked(f"{stack}_{name}", name, **attrs)

    def process_weights_after_loading(self, experts: MoEExperts) -> None:
        names = self.method.checkpoint_params
        for stack, (k, shards) in self._stacks(experts).items():
            stacked = {name: getattr(experts, f"{stack}_{name}").detach() for name in names}
            group = self.method.group_for(k)
            device = stacked[names[0]].device
            slots = experts.num_local_experts
            dense = torch.empty((slots, sum(shards.values()), k), dtype=experts.compute_dtype, device=device)  # fmt: skip
            inputs, sources = self._checkpoint_layout(experts, stack, k)
            for e in range(slots):
                where = f"expert {experts.slot_experts[e]} {stack}"
                q, zeros, scales = self.method.unpack(
                    {n: t[e] for n, t in stacked.items()}, shards, inputs, where, sources
                )
                _check_finite(scales, where)
                dense[e] = dequantize(q, zeros, scales, group, experts.compute_dtype)
            for name in names:
                delattr(experts, f"{stack}_{name}")
            setattr(experts, stack, nn.Parameter(dense, requires_grad=False))
