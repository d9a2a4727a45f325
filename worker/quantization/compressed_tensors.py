"""quant_method "compressed-tensors" (what llm-compressor writes): one config group of schemes,
dispatched by its `format` to a quant method.

- `float-quantized` / `naive-quantized` with 8-bit float weights: FP8 (fp8.py), strategy tensor,
  channel or block (`block_structure`); `weight_scale` holds the scale whatever the strategy.
  `input_activations` say how the GPU's W8A8 path quantizes activations: dynamically (per token,
  or per token group with block weights), statically with each layer's per-tensor `input_scale`
  (`dynamic: false`, strategy tensor), or not at all (absent: FP8 weight-only, the W8A16
  GEMM on every GPU). CPU never quantizes activations (see fp8.py).
- `pack-quantized` with 4-bit int weights and no activation quantization: W4A16. Per layer
  `weight_packed` int32 [N, K / 8] (input 8c + i in nibble i of word c, stored as the signed
  value + 8), `weight_scale` [N, K / group] (strategy group) or [N, 1] (channel), `weight_shape`
  [2] (the unpacked [N, K]), and for an asymmetric scheme `weight_zero_point` int32
  [N / 8, K / group] packed along the outputs (signed + 8 as well). The real weight is
  (q - zero) * scale; a symmetric scheme's zero is 0 (8 unsigned). Under tensor parallelism a
  row-parallel rank reads its columns (`input_dim` 1: 8 inputs per word of weight_packed, a
  group per column of the group scales and zero points; a per-channel scale whole), a fused
  column-parallel one its rows (8 per row of weight_zero_point); `weight_shape` is read whole
  and checked against the checkpoint's layer. See int4.py for how it is held
  (repacked for the Triton W4A16 GEMM on CUDA, dequantized once on CPU); MoE experts store the
  same tensors per expert and are dequantized at load.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from splitserve.worker.linear import Linear, LinearMethod
from splitserve.worker.moe import MoEExperts, MoEExpertsMethod
from splitserve.worker.quantization import QuantConfig, ignored_layer
from splitserve.worker.quantization.fp8 import Fp8LinearMethod, Fp8MoEMethod, parse_block
from splitserve.worker.quantization.int4 import (
    PACK,
    Int4LinearMethod,
    Int4MoEMethod,
    TensorSpecs,
    unpack_int32,
)

FP8_FORMATS = ("float-quantized", "naive-quantized")
INT4_FORMAT = "pack-quantized"
FP8_STRATEGIES = ("tensor", "channel", "block")
FP8_ACTIVATIONS = ("dynamic", "static", "none")
"""How FP8 layers' activations are quantized: per token on the fly, with the checkpoint's
per-tensor `input_scale`, or not at all (weight-only)."""
INT4_STRATEGIES = ("group", "channel")
STATIC_ACTORDER = (None, "static", "weight")
"""Activation orders that keep groups contiguous (no `weight_g_idx` to follow)."""


class PackQuantizedLinearMethod(Int4LinearMethod):
    """A `pack-quantized` W4A16 layer as llm-compressor saves it (group None: per channel)."""

    def __init__(self, group: int | None, symmetric: bool) -> None:
        self.group, self.symmetric = group, symmetric
        self.checkpoint_params = ("weight_packed", "weight_scale", "weight_shape")
        if not symmetric:
            self.checkpoint_params += ("weight_zero_point",)

    def input_group(self) -> int | None:
        return self.group

    def tensor_specs(
        self, in_features: int, out_features: int, shards: dict[str, int] | None
    ) -> TensorSpecs:
        groups = in_features // self.group_for(in_features)
        # NOTE: per channel (group None) a scale or zero point has no input axis to slice.
        grouped = {"input_dim": 1, "col_block": self.group} if self.group else {}
        specs: TensorSpecs = {
            "weight_packed": (
                (out_features, in_features // PACK),
                torch.int32,
                {"input_dim": 1, "col_block": PACK},
            ),
            "weight_scale": ((out_features, groups), torch.float32, grouped),
            "weight_shape": (
                (len(shards), 2) if shards else (2,),
                torch.int64,
                {"per_shard": True} if shards else {},
            ),
        }
        if not self.symmetric:
            specs["weight_zero_point"] = (
                (out_features // PACK, groups),
                torch.int32,
                {"row_block": PACK, **grouped},
            )
        return specs

    def unpack(
        self,
        tensors: dict[str, torch.Tensor],
        shards: dict[str | None, int],
        in_features: int,
        where: str,
        row_sources: dict[str, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        saved = tensors["weight_shape"].reshape(-1, 2).tolist()
        for (shard, size), shape in zip(shards.items(), saved, strict=True):
            what = f"shard {shard!r} weight_shape" if shard else "weight_shape"
            first = (row_sources or {}).get(shard)
            if first is None and shape != [size, in_features]:
                raise ValueError(
                    f"{where}: {what} says {shape}, the model expects [{size}, {in_features}]"
                )
            if first is not None and (shape[1] != in_features or shape[0] < first + size):
                raise ValueError(
                    f"{where}: {what} says {shape}, the model expects {in_features} inputs and "
                    f"this tensor-parallel rank's output rows [{first}, {first + size})"
                )
        q = unpack_int32(tensors["weight_packed"])
        scales = tensors["weight_scale"].float()
        if self.symmetric:
            zeros = torch.full(scales.shape, 8, dtype=torch.int32, device=scales.device)
        else:
            zeros = unpack_int32(tensors["weight_zero_point"].t()).t()
        return q, zeros, scales


class CompressedTensorsConfig(QuantConfig):
    """quant_method "compressed-tensors": one config group, FP8 or W4A16 (see the module)."""

    name: ClassVar[str] = "compressed-tensors"

    def __init__(
        self,
        kind: str,
        ignored: list[str],
        block: tuple[int, int] | None = None,
        group: int | None = None,
        symmetric: bool = True,
        activations: str = "dynamic",
    ) -> None:
        if activations not in FP8_ACTIVATIONS:
            raise ValueError(f"activations must be one of {FP8_ACTIVATIONS}, got {activations!r}")
        self.kind, self.ignored, self.block = kind, ignored, block
        self.group, self.symmetric = group, symmetric
        self.activations = activations

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        groups = config.get("config_groups") or {}
        if len(groups) != 1:
            raise ValueError(
                "compressed-tensors: splitserve loads checkpoints with exactly one of "
                f"config_groups, got {len(groups)} ({', '.join(groups) or 'none'})"
            )
        ((group_name, group),) = groups.items()
        fmt = group.get("format") or config.get("format")
        weights = group.get("weights") or {}
        where = f"compressed-tensors config_groups.{group_name}"
        ignored = list(config.get("ignore") or [])
        if group.get("targets") != ["Linear"]:
            raise ValueError(f"{where}: targets {group.get('targets')!r}; supported: ['Linear']")
        wtype, bits = weights.get("type"), weights.get("num_bits")
        if fmt == INT4_FORMAT and wtype == "int":
            return cls._int4(where, weights, group, ignored)
        if fmt not in FP8_FORMATS or wtype != "float" or bits != 8:
            raise ValueError(
                f"{where}: format {fmt!r} with {bits}-bit {wtype} weights is not supported; "
                f"splitserve loads the FP8 schemes ({' / '.join(FP8_FORMATS)}, 8-bit float "
                f"weights) and W4A16 ({INT4_FORMAT}, 4-bit int weights)"
            )
        if not weights.get("symmetric", True) or weights.get("dynamic", False):
            raise ValueError(f"{where}: FP8 weights must be static and symmetric")
        strategy = weights.get("strategy")
        if strategy not in FP8_STRATEGIES:
            raise ValueError(
                f"{where}: weight strategy {strategy!r}; supported: {', '.join(FP8_STRATEGIES)}"
            )
        block = None
        if strategy == "block":
            block = parse_block(weights.get("block_structure"), "weights.block_structure")
        activations = _fp8_activations(where, group.get("input_activations"), strategy)
        return cls(strategy, ignored, block=block, activations=activations)

    @classmethod
    def _int4(cls, where: str, weights: dict, group: dict, ignored: list[str]):
        bits = weights.get("num_bits")
        if bits != 4:
            raise ValueError(
                f"{where}: {INT4_FORMAT} with {bits}-bit int weights is not supported; "
                "splitserve loads 4-bit ones (W4A16)"
            )
        if group.get("input_activations") is not None:
            raise ValueError(
                f"{where}: {INT4_FORMAT} with quantized input activations is not supported; "
                "splitserve loads weight-only W4A16"
            )
        if weights.get("dynamic", False):
            raise ValueError(f"{where}: int4 weights must be static")
        strategy = weights.get("strategy")
        if strategy not in INT4_STRATEGIES:
            raise ValueError(
                f"{where}: int4 weight strategy {strategy!r}; supported: "
                f"{', '.join(INT4_STRATEGIES)}"
            )
        if weights.get("actorder") not in STATIC_ACTORDER:
            raise ValueError(
                f"{where}: actorder {weights.get('actorder')!r} (groups in activation order, "
                "with weight_g_idx) is not supported; supported: static, weight or none"
            )
        size = None
        if strategy == "group":
            size = weights.get("group_size")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(
                    f"{where}: weights.group_size must be a positive int, got {size!r}"
                )
        return cls("int4", ignored, group=size, symmetric=bool(weights.get("symmetric", True)))

    def linear_method(self, layer: Linear, checkpoint_names: list[str]) -> LinearMethod | None:
        if ignored_layer(self.name, checkpoint_names, self.ignored):
            return None
        if self.kind == "int4":
            return PackQuantizedLinearMethod(self.group, self.symmetric)
        return Fp8LinearMethod(
            "weight_scale",
            self.kind,
            self.block,
            static_input=self.activations == "static",
            weight_only=self.activations == "none",
        )

    def moe_method(self, experts: MoEExperts, name: str) -> MoEExpertsMethod | None:
        if ignored_layer(self.name, [name], self.ignored):
            return None
        if self.kind == "int4":
            return Int4MoEMethod(PackQuantizedLinearMethod(self.group, self.symmetric))
        return Fp8MoEMethod(
            "weight_scale", self.kind, self.block, static_input=self.activations == "static"
        )

    def skips_tensor(self, name: str) -> bool:
        if self.kind == "int4":
            return False
        if self.activations != "static" and name.endswith(".input_scale"):
            return True
        # Symmetric FP8 stores zero points of 0 (compressed-tensors writes them): nothing to read.
        return name.endswith((".input_zero_point", ".weight_zero_point"))


def _fp8_activations(where: str, args: dict | None, weight_strategy: str) -> str:
    """FP8_ACTIVATIONS of a scheme's `input_activations`; anything else is refused by name."""
    if args is None:
        return "none"
    kind, bits = args.get("type", "float"), args.get("num_bits", 8)
    if kind != "float" or bits != 8 or not args.get("symmetric", True):
        raise ValueError(
            f"{where}: input_activations of {bits}-bit {kind} "
            f"({'symmetric' if args.get('symmetric', True) else 'asymmetric'}) are not supported "
            "with FP8 weights; supported: 8-bit float, symmetric"
        )
    strategy = args.get("strategy")
    if args.get("dynamic", False):
        if strategy not in ("token", "group", "tensor"):
            raise ValueError(
                f"{where}: dynamic input_activations strategy {strategy!r}; supported: token, "
                "group, tensor"
            )
        return "dynamic"
    if strategy != "tensor":
        raise ValueError(
            f"{where}: static input_activations strategy {strategy!r}; supported: tensor "
            "(one calibrated input_scale per layer)"
        )
    if weight_strategy == "block":
        raise ValueError(
            f"{where}: static input_activations with block weights are not supported; block "
            "FP8 quantizes activations per token group (dynamic)"
        )
    return "static"
