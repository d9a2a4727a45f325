"""FP8 (e4m3) checkpoints: `fp8` (per-tensor, or block-wise `weight_block_size`), `fbgemm_fp8`
(per-channel), `compressed-tensors` FP8 (`float-quantized`: tensor, channel or block; its config
is parsed in compressed_tensors.py), and
`--quantization fp8` on an unquantized model (quantized per output channel at load).

Every format keeps, per layer, an FP8 weight [out, in] and a scale that reduces to one layout,
`scale [ceil(out / bn), ceil(in / bk)]` with a block (bn, bk): per-tensor is block (out, in)
(fused q/k/v and gate/up carry one scale per shard, so they become per-row), per-channel
(1, in), block-wise (bn, bk). The real weight is `weight[n, k] * scale[n // bn, k // bk]`
(`kernels.reference.fp8_dequantize_ref`).

On CUDA the weight stays FP8 and `kernels.dispatch.fp8_linear` picks by capability: the W8A8
Triton GEMM on GPUs with FP8 tensor cores (>= 8.9), else the W8A16 GEMM (dequantized in the
load stage). W8A8 quantizes activations as the checkpoint says: dynamically per token (or per
token and bk-group when block-scaled; fbgemm_fp8's `activation_scale_ub` caps them), or, with
activation_scheme "static" (`fp8`, compressed-tensors `input_activations.dynamic: false`), with
the checkpoint's per-tensor `input_scale`. A fused q/k/v or gate/up layer reads one input, so
its shards' input scales become their maximum (no shard's calibrated range is clipped).
On CPU the weight is dequantized to the compute dtype once,
in `process_weights_after_loading`, and the layer then runs as an unquantized one (oneDNN
included): weight-only, activations are never quantized, so the CPU model equals the model
on its dequantized weights.

Memory trade-off of dequantizing once at load: a CPU worker holds the dense weights (4 bytes
per parameter in fp32, 4x the FP8 checkpoint; 2x in bf16) and pays the dequantization once;
each step is then exactly as fast as the unquantized model. Dequantizing per layer on each
forward would keep the FP8 bytes (1 per parameter) at the cost of one dequantization of every
weight per step (about the cost of the GEMM itself at decode shapes) and a transient dense copy
of the largest layer. Serving FP8 on CPU is about loading FP8 checkpoints, not saving memory.
While loading, the FP8 tensors of a layer and its dense copy coexist only for that layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from splitserve.kernels import dispatch
from splitserve.kernels.reference import fp8_dequantize_ref
from splitserve.worker.linear import Linear, LinearMethod, MergedLinear, UnquantizedLinearMethod
from splitserve.worker.moe import MoEExperts, MoEExpertsMethod
from splitserve.worker.parallel_layers import RowParallelLinear
from splitserve.worker.quantization import QuantConfig, ignored_layer

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_KINDS = ("tensor", "channel", "block")

_DENSE = UnquantizedLinearMethod()


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight [N, K], float32 scale [N, 1]) with each row's absmax mapped to 448."""
    amax = weight.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def scale_2d(
    kind: str,
    scale: torch.Tensor,
    shape: tuple[int, int],
    shards: list[int] | None,
    block: tuple[int, int] | None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """A checkpoint scale of layout `kind` for a weight of `shape` [N, K] (fused from `shards`
    output sizes, or None) as [ceil(N / bn), ceil(K / bk)] float32, and (bn, bk)."""
    n, k = shape
    scale = scale.float()
    if kind == "channel":
        return scale.reshape(n, 1), (1, k)
    if kind == "block":
        return scale, block
    if shards is not None:
        sizes = torch.tensor(shards, device=scale.device)
        return scale.reshape(-1).repeat_interleave(sizes).reshape(n, 1), (1, k)
    return scale.reshape(1, 1), (n, k)


def _check_finite(scale: torch.Tensor, where: str) -> None:
    if not torch.isfinite(scale).all():
        raise ValueError(f"{where}: its FP8 scale holds non-finite values (a corrupt checkpoint?)")


def _finish(layer: Linear, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]):
    """Hold the FP8 weight for the Triton GEMM (CUDA), or its dense copy (CPU)."""
    _check_finite(scale, f"layer ({layer.extra_repr()})")
    layer.fp8_dense = not (weight.is_cuda and dispatch.triton_available())
    if layer.fp8_dense:
        dense = fp8_dequantize_ref(weight, scale, block, layer.compute_dtype)
        layer.weight = nn.Parameter(dense, requires_grad=False)
        _DENSE.process_weights_after_loading(layer)  # oneDNN on CPU float32, as unquantized
        return
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    layer.fp8_scale = nn.Parameter(scale.float().contiguous(), requires_grad=False)
    layer.fp8_block = block


def _static_input_scale(layer: Linear) -> torch.Tensor:
    """The layer's one activation scale (float32 scalar): its shards' maximum. Kept on CPU
    layers too (the weight-only path does not read it) so what the GPU would use is visible."""
    scales = layer.input_scale.detach().float()
    delattr(layer, "input_scale")
    if not torch.isfinite(scales).all() or (scales == 0).any():
        raise ValueError(
            f"layer ({layer.extra_repr()}): its FP8 input_scale must be finite and non-zero, "
            f"got {scales.tolist()}"
        )
    # A scale's sign cancels (x / s, then * s); magnitudes compare (dummy weights are signed).
    return nn.Parameter(scales.abs().max().reshape(()), requires_grad=False)


def _apply(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    if layer.fp8_dense:
        return _DENSE.apply(layer, x)
    return dispatch.fp8_linear(
        x, layer.weight, layer.fp8_scale, layer.fp8_block, layer.bias,
        activation_scale_ub=getattr(layer, "fp8_activation_scale_ub", None),
        input_scale=getattr(layer, "fp8_input_scale", None),
        weight_only=getattr(layer, "fp8_weight_only", False),
    )  # fmt: skip


class Fp8LinearMethod(LinearMethod):
    """A serialized FP8 weight and its scale tensor, as the checkpoint stores them.

    kind "tensor": `scale_name` holds one value per checkpoint shard (shape [shards]);
    "channel": [out, 1]; "block": [ceil(out / bn), ceil(in / bk)], every fused shard's rows a
    whole number of blocks. `static_input`: the checkpoint also stores each layer's (each
    shard's) per-tensor activation scale, `input_scale`; `weight_only`: it quantized no
    activations.

    Under tensor parallelism a rank reads its slice of each tensor: a column-parallel layer
    (fused q/k/v, gate/up) its output rows of the weight and of a per-channel or block scale
    (by whole blocks), a row-parallel one (o_proj, down_proj) its input columns of the weight
    and of a block scale (by whole blocks); per-tensor, per-channel-of-a-row-parallel-layer
    and input scales are read whole. A slice that is not whole blocks is refused. Where the
    GPU quantizes activations dynamically, a row-parallel rank scales its own input columns:
    per token group with block weights (whole groups, as on one rank), per token otherwise (the
    scale of the rank's slice, which may be finer than one rank's whole-row scale).
    """

    supports_tensor_parallel = True

    def __init__(
        self,
        scale_name: str,
        kind: str,
        block: tuple[int, int] | None = None,
        activation_scale_ub: float | None = None,
        static_input: bool = False,
        weight_only: bool = False,
    ) -> None:
        if kind not in SCALE_KINDS or (kind == "block") != (block is not None):
            raise ValueError(f"bad FP8 layout {kind!r} {block}")
        if static_input and kind == "block":
            raise ValueError(
                "static activation scales with block-wise weights are not a format: block-scaled "
                "FP8 quantizes activations per token group (activation_scheme dynamic)"
            )
        self.scale_name, self.kind, self.block = scale_name, kind, block
        self.activation_scale_ub = activation_scale_ub
        """Cap on a token's absmax where the GPU quantizes activations (W8A8; fbgemm_fp8)."""
        self.static_input = static_input
        self.weight_only = weight_only
        """The checkpoint quantized no activations: the GPU takes the W8A16 GEMM whatever its
        capability."""

    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool):
        layer.compute_dtype = torch.get_default_dtype()
        layer.onednn = False
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False
        )
        layer.register_weight("weight", input_dim=1)
        attrs: dict[str, Any] = {}
        if self.kind == "channel":
            shape: tuple[int, ...] = (out_features, 1)
        elif self.kind == "tensor":
            shape = (len(layer.shard_sizes) if isinstance(layer, MergedLinear) else 1,)
            attrs["per_shard"] = True
        else:
            bn, bk = self.block
            check_whole_blocks(layer, bn, bk)
            shape = (-(-out_features // bn), -(-in_features // bk))
            attrs.update(row_block=bn, input_dim=1, col_block=bk)
        scale = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
        setattr(layer, self.scale_name, scale)
        layer.register_weight(self.scale_name, **attrs)
        if self.static_input:
            shards = len(layer.shard_sizes) if isinstance(layer, MergedLinear) else 1
            layer.input_scale = nn.Parameter(torch.empty(shards), requires_grad=False)
            layer.register_weight("input_scale", per_shard=True)
        layer.create_bias(bias)

    def scale_2d(self, layer: Linear) -> tuple[torch.Tensor, tuple[int, int]]:
        """The layer's scale as [ceil(N / bn), ceil(K / bk)] float32, and (bn, bk)."""
        shards = list(layer.shard_sizes.values()) if isinstance(layer, MergedLinear) else None
        return scale_2d(
            self.kind,
            getattr(layer, self.scale_name).detach(),
            (layer.out_features, layer.in_features),
            shards,
            self.block,
        )

    def process_weights_after_loading(self, layer: Linear) -> None:
        scale, block = self.scale_2d(layer)
        delattr(layer, self.scale_name)
        layer.fp8_activation_scale_ub = self.activation_scale_ub
        layer.fp8_weight_only = self.weight_only
        if self.static_input:
            layer.fp8_input_scale = _static_input_scale(layer)
        _finish(layer, layer.weight.detach(), scale, block)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return _apply(layer, x)


def check_whole_blocks(layer: Linear, bn: int, bk: int, what: str | None = None) -> None:
    """ValueError unless every fused shard of `layer` (under tensor parallelism: this rank's
    rows of it) is a whole number of bn-row blocks, and a row-parallel layer's input columns
    a whole number of bk-column blocks: a block scale (or an int4 pack or group, `what` naming
    the layout in the message; default the FP8 block) is sliced by whole blocks only."""
    what = what or f"weight_block_size [{bn}, {bk}]"
    for shard, size in getattr(layer, "shard_sizes", {}).items():
        if size % bn == 0:
            continue
        if getattr(layer, "shard_sources", None):
            raise ValueError(
                f"{what}: tensor parallelism gives this rank {size} output rows of shard "
                f"{shard!r}, not a whole number of {bn}-row blocks; use a "
                "--tensor-parallel-size that splits every shard into whole blocks (or 1)"
            )
        raise ValueError(
            f"{what} does not divide shard {shard!r}: its {size} output rows are not a "
            f"multiple of {bn}"
        )
    if isinstance(layer, RowParallelLinear) and layer.in_features % bk:
        raise ValueError(
            f"{what}: tensor parallelism gives each of {layer.tp_size} ranks "
            f"{layer.in_features} of the {layer.tp_size * layer.in_features} input features, "
            f"not a whole number of {bk}-column blocks; use a --tensor-parallel-size that "
            "splits the input features into whole blocks (or 1)"
        )


class Fp8OnlineLinearMethod(UnquantizedLinearMethod):
    """`--quantization fp8` on an unquantized checkpoint: the weight loads in the compute
    dtype, then is quantized per output channel (absmax -> 448); CPU keeps its dequantized
    copy (the FP8-rounded weight), CUDA the FP8 weight. Loading briefly holds the full-
    precision weight, as the unquantized model would."""

    supports_tensor_parallel = False
    tensor_parallel_refusal = (
        "--quantization fp8 at load takes each output channel's scale from its whole row, "
        "which a row-parallel rank does not hold, so its scales would differ from one rank's; "
        "quantize the checkpoint first (an fp8 or compressed-tensors FP8 checkpoint loads "
        "under tensor parallelism)"
    )

    def create_weights(self, layer: Linear, in_features: int, out_features: int, bias: bool):
        super().create_weights(layer, in_features, out_features, bias)
        layer.compute_dtype = torch.get_default_dtype()

    def process_weights_after_loading(self, layer: Linear) -> None:
        weight, scale = quantize_per_channel(layer.weight.detach())
        _finish(layer, weight, scale, (1, layer.in_features))

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return _apply(layer, x)


def _expert_shapes(experts: MoEExperts) -> dict[str, tuple[tuple[int, int], list[int] | None]]:
    """Stacked parameter -> (one expert's [N, K], its fused shard sizes or None)."""
    hidden, inter = experts.hidden_size, experts.intermediate_size
    return {
        "gate_up_proj": ((2 * inter, hidden), [inter, inter]),
        "down_proj": ((hidden, inter), None),
    }


class Fp8MoEMethod(MoEExpertsMethod):
    """FP8 experts as the checkpoint stores them (per expert: weight + scale of layout `kind`),
    stacked. Block-scaled experts on GPUs with FP8 tensor cores stay FP8 and run on the FP8
    grouped GEMM (`dispatch.fused_moe_fp8`); every other layout and device dequantizes them to
    the compute dtype at load (the fused-MoE paths read dense stacks), so such a checkpoint
    computes as its dequantized model but takes the dense model's memory. With
    `static_input` the experts' `input_scale` tensors are read (their shapes checked) and then
    dropped: dense experts do not quantize their activations.

    Under tensor parallelism each rank reads its slice of every expert's intermediate
    features: gate / up output rows of the weight and of a per-channel or block scale (by
    whole bn-row blocks), down input columns of the weight and of a block scale (by whole
    bk-column blocks); per-tensor, input and down's per-channel scales are read whole. A slice
    that is not whole blocks is refused. Under expert parallelism every stack (weights and
    scales) holds this rank's slots along dim 0, so EPLB moves a slot's scales with it."""

    supports_tensor_parallel = True

    def __init__(
        self,
        scale_name: str,
        kind: str,
        block: tuple[int, int] | None = None,
        static_input: bool = False,
    ) -> None:
        self.scale_name, self.kind, self.block = scale_name, kind, block
        self.static_input = static_input
        self.checkpoint_params = {"weight": "", scale_name: "_scale"}
        if static_input:
            self.checkpoint_params["input_scale"] = "_input_scale"

    def create_weights(self, experts: MoEExperts) -> None:
        experts.compute_dtype = torch.get_default_dtype()
        num = experts.num_local_experts
        if self.kind == "block":
            check_expert_blocks(experts, *self.block)
        for name, ((n, k), shards) in _expert_shapes(experts).items():
            down = shards is None
            weight = torch.empty(num, n, k, dtype=FP8_DTYPE)
            setattr(experts, name, nn.Parameter(weight, requires_grad=False))
            experts.register_stacked(name, **({"input_dim": 1} if down else {}))
            attrs: dict[str, Any] = {}
            if self.kind == "channel":
                shape: tuple[int, ...] = (num, n, 1)
            elif self.kind == "tensor":
                shape = (num, 2) if shards else (num,)
                attrs["per_shard"] = True
            else:
                bn, bk = self.block
                shape = (num, -(-n // bn), -(-k // bk))
                attrs["row_block"] = bn
                if down:
                    attrs.update(input_dim=1, col_block=bk)
            scale = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
            setattr(experts, name + "_scale", scale)
            experts.register_stacked(name + "_scale", self.scale_name, **attrs)
            if self.static_input:
                shape = (num, 2) if shards else (num,)
                inputs = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
                setattr(experts, name + "_input_scale", inputs)
                experts.register_stacked(name + "_input_scale", "input_scale", per_shard=True)

    def process_weights_after_loading(self, experts: MoEExperts) -> None:
        """Block-scaled experts where `dispatch.fp8_moe_native` says so (CUDA with FP8 tensor
        cores) stay FP8 with their [E, ceil(N / bn), ceil(K / bk)] scales (W8A8 on the grouped
        GEMM); everywhere else the experts are dequantized here."""
        device = experts.gate_up_proj.device
        experts.fp8_native = self.kind == "block" and dispatch.fp8_moe_native(device, self.block)
        if experts.fp8_native:
            experts.fp8_block = self.block
            for name in _expert_shapes(experts):
                scale = getattr(experts, name + "_scale").detach()
                _check_finite(scale, f"experts {name}")
                weight = getattr(experts, name).detach()
                setattr(experts, name, nn.Parameter(weight.contiguous(), requires_grad=False))
                setattr(experts, name + "_scale", nn.Parameter(scale.float().contiguous(), requires_grad=False))  # fmt: skip
            return
        for name, (shape, shards) in _expert_shapes(experts).items():
            weight = getattr(experts, name).detach()
            scales = getattr(experts, name + "_scale").detach()
            dense = torch.empty(weight.shape, dtype=experts.compute_dtype, device=weight.device)
            for e in range(weight.shape[0]):  # local slots
                scale, block = scale_2d(self.kind, scales[e], shape, shards, self.block)
                _check_finite(scale, f"expert {e} {name}")
                dense[e] = fp8_dequantize_ref(weight[e], scale, block, experts.compute_dtype)
            delattr(experts, name + "_scale")
            if self.static_input:
                delattr(experts, name + "_input_scale")
            setattr(experts, name, nn.Parameter(dense, requires_grad=False))

    def apply(
        self,
        experts: MoEExperts,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        if not experts.fp8_native:
            return dispatch.fused_moe(
                x, experts.gate_up_proj, experts.down_proj, topk_weights, topk_ids
            )
        return dispatch.fused_moe_fp8(
            x, experts.gate_up_proj, experts.gate_up_proj_scale, experts.down_proj,
            experts.down_proj_scale, experts.fp8_block, topk_weights, topk_ids,
        )  # fmt: skip


def check_expert_blocks(experts: MoEExperts, bn: int, bk: int, what: str | None = None) -> None:
    """ValueError unless the experts' intermediate features (this rank's, under tensor
    parallelism) are whole bn-row blocks of gate / up and, when sliced over ranks, whole
    bk-column blocks of down: a block scale (or an int4 pack or group, `what` naming the
    layout; default the FP8 block) is sliced by whole blocks only."""
    inter, tp = experts.intermediate_size, experts.tp_size
    what = what or f"weight_block_size [{bn}, {bk}]"
    if tp > 1 and (inter % bn or inter % bk):
        cut = f"{bn}-row blocks of gate / up" if inter % bn else f"{bk}-column blocks of down"
        raise ValueError(
            f"{what}: tensor parallelism gives each of {tp} ranks {inter} of the experts' "
            f"{tp * inter} intermediate features, not a whole number of {cut}; use a "
            "--tensor-parallel-size that splits them into whole blocks (or 1), or "
            "--enable-expert-parallel (whole experts on each rank)"
        )
    if inter % bn:
        raise ValueError(
            f"{what} does not divide the experts' intermediate size {inter} (the gate / up "
            "halves of one stacked tensor)"
        )


class Fp8OnlineMoEMethod(MoEExpertsMethod):
    """`--quantization fp8` on unquantized experts: each expert's stacks quantized per output
    channel at load, then held dequantized (see Fp8MoEMethod)."""

    tensor_parallel_refusal = (
        "--quantization fp8 at load takes each expert's down_proj scales from whole rows, "
        "which a tensor-parallel rank does not hold; quantize the checkpoint first (an fp8 or "
        "compressed-tensors FP8 checkpoint's experts load under tensor and expert parallelism)"
    )

    checkpoint_params = {"weight": ""}

    def create_weights(self, experts: MoEExperts) -> None:
        num = experts.num_local_experts
        for name, ((n, k), shards) in _expert_shapes(experts).items():
            setattr(experts, name, nn.Parameter(torch.empty(num, n, k), requires_grad=False))
            experts.register_stacked(name, **({} if shards else {"input_dim": 1}))

    def process_weights_after_loading(self, experts: MoEExperts) -> None:
        for name in ("gate_up_proj", "down_proj"):
            stack = getattr(experts, name).detach()
            for e in range(stack.shape[0]):
                weight, scale = quantize_per_channel(stack[e])
                stack[e] = fp8_dequantize_ref(weight, scale, (1, stack.shape[2]), stack.dtype)


def parse_block(value: Any, field: str) -> tuple[int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise ValueError(f"quantization_config.{field} must be two positive ints, got {value!r}")
    return int(value[0]), int(value[1])


class Fp8Config(QuantConfig):
    """quant_method "fp8": per-tensor `weight_scale` (+ static `input_scale`), or block-wise
    `weight_scale_inv` with `weight_block_size` (DeepSeek-V3, Qwen3-FP8). Not serialized: the
    online `--quantization fp8` of an unquantized checkpoint."""

    name: ClassVar[str] = "fp8"

    def __init__(
        self,
        serialized: bool = True,
        block: tuple[int, int] | None = None,
        ignored: list[str] | None = None,
        static_input: bool = False,
    ) -> None:
        self.serialized, self.block, self.ignored = serialized, block, list(ignored or [])
        self.static_input = static_input
        """activation_scheme "static": every quantized layer stores its `input_scale`."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ("static", "dynamic"):
            raise ValueError(
                f"quantization_config.activation_scheme must be static or dynamic, got {scheme!r}"
            )
        block = config.get("weight_block_size")
        ignored = config.get("ignored_layers") or config.get("modules_to_not_convert") or []
        if block is not None and scheme == "static":
            raise ValueError(
                "quantization_config: activation_scheme static with weight_block_size is not "
                "supported (block-wise FP8 quantizes activations per token group: dynamic)"
            )
        return cls(
            True,
            None if block is None else parse_block(block, "weight_block_size"),
            ignored,
            static_input=scheme == "static",
        )

    def linear_method(self, layer: Linear, checkpoint_names: list[str]) -> LinearMethod | None:
        if ignored_layer(self.name, checkpoint_names, self.ignored):
            return None
        if not self.serialized:
            return Fp8OnlineLinearMethod()
        if self.block is not None:
            return Fp8LinearMethod("weight_scale_inv", "block", self.block)
        return Fp8LinearMethod("weight_scale", "tensor", static_input=self.static_input)

    def moe_method(self, experts: MoEExperts, name: str) -> MoEExpertsMethod | None:
        if ignored_layer(self.name, [name], self.ignored):
            return None
        if not self.serialized:
            return Fp8OnlineMoEMethod()
        if self.block is not None:
            return Fp8MoEMethod("weight_scale_inv", "block", self.block)
        return Fp8MoEMethod("weight_scale", "tensor", static_input=self.static_input)

    def skips_tensor(self, name: str) -> bool:
        # A dynamic-scheme checkpoint may still carry calibration input scales: unused.
        return not self.static_input and name.endswith(".input_scale")


class FbgemmFp8Config(QuantConfig):
    """quant_method "fbgemm_fp8": per-channel `weight_scale` [out, 1]; activations are
    quantized per token on GPUs with FP8 GEMMs, capped by `activation_scale_ub` (kept for that
    path; the weight-only paths do not quantize activations)."""

    name: ClassVar[str] = "fbgemm_fp8"

    def __init__(self, activation_scale_ub: float, ignored: list[str]) -> None:
        self.activation_scale_ub, self.ignored = activation_scale_ub, ignored

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FbgemmFp8Config:
        ub = config.get("activation_scale_ub", 1200.0)
        if not isinstance(ub, int | float) or ub <= 0:
            raise ValueError(
                f"quantization_config.activation_scale_ub must be a positive number, got {ub!r}"
            )
        return cls(float(ub), list(config.get("modules_to_not_convert") or []))

    def linear_method(self, layer: Linear, checkpoint_names: list[str]) -> LinearMethod | None:
        if ignored_layer(self.name, checkpoint_names, self.ignored):
            return None
        return Fp8LinearMethod("weight_scale", "channel", None, self.activation_scale_ub)

    def moe_method(self, experts: MoEExperts, name: str) -> MoEExpertsMethod | None:
        if ignored_layer(self.name, [name], self.ignored):
            return None
        return Fp8MoEMethod("weight_scale", "channel")

    def skips_tensor(self, name: str) -> bool:
        return name.endswith(".input_scale_ub")
