"""AWQ checkpoints (quant_method "awq", AutoAWQ's GEMM layout): 4-bit weights with a zero point
per group of `group_size` input features.

Per layer the checkpoint stores, transposed against nn.Linear ([in, out]):
- `qweight` int32 [K, N / 8]: each word packs 8 consecutive output columns in AutoAWQ's order,
  nibble i (bits 4i..4i+3) holding column AWQ_ORDER[i] of its 8;
- `qzeros` int32 [K / group, N / 8], packed the same way;
- `scales` fp16 [K / group, N].
The real weight is W[n, k] = (q[k, n] - zero[k // group, n]) * scale[k // group, n]. The
output axis is the last one, so fused q/k/v and gate/up shards load into column ranges
(`output_dim` 1; 8 outputs per word of qweight / qzeros), and a tensor-parallel rank's slice of
a row-parallel layer is a range of rows (`input_dim` 0; one input per row of qweight, a group
per row of qzeros / scales). See int4.py for how the unpacked
weight is held (repacked for the Triton GEMM on CUDA, dequantized once on CPU) and the memory
trade-off. MoE experts store the same tensors per expert (`experts.3.w1.qweight`); they are
dequantized at load (int4.Int4MoEMethod).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from splitserve.worker.linear import Linear, LinearMethod
from splitserve.worker.moe import MoEExperts, MoEExpertsMethod
from splitserve.worker.quantization import QuantConfig, ignored_layer
from splitserve.worker.quantization.int4 import (
    PACK,
    Int4LinearMethod,
    Int4MoEMethod,
    TensorSpecs,
    unpack_int32,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of an AutoAWQ word holds column AWQ_ORDER[i] of its group of 8 columns."""
SUPPORTED_BITS = (4,)
SUPPORTED_VERSIONS = ("gemm",)


class AwqLinearMethod(Int4LinearMethod):
    """`qweight`, `qzeros` and `scales` as AutoAWQ saves them."""

    checkpoint_params = ("qweight", "qzeros", "scales")

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def input_group(self) -> int | None:
        return self.group_size

    def tensor_specs(
        self, in_features: int, out_features: int, shards: dict[str, int] | None
    ) -> TensorSpecs:
        groups, packed = in_features // self.group_size, out_features // PACK
        outputs, grouped = {"output_dim": 1, "row_block": PACK}, {"input_dim": 0, "col_block": self.group_size}  # fmt: skip
        return {
            "qweight": ((in_features, packed), torch.int32, {**outputs, "input_dim": 0}),
            "qzeros": ((groups, packed), torch.int32, {**outputs, **grouped}),
            "scales": ((groups, out_features), torch.float32, {"output_dim": 1, **grouped}),
        }

    def unpack(
        self,
        tensors: dict[str, torch.Tensor],
        shards: dict[str | None, int],
        in_features: int,
        where: str,
        row_sources: dict[str, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = unpack_int32(tensors["qweight"], AWQ_ORDER).t()
        zeros = unpack_int32(tensors["qzeros"], AWQ_ORDER).t()
        return q, zeros, tensors["scales"].float().t()


class AwqConfig(QuantConfig):
    """quant_method "awq": `bits` 4, `group_size`, `zero_point` true, `version` "gemm";
    `modules_to_not_convert` stay unquantized."""

    name: ClassVar[str] = "awq"

    def __init__(self, group_size: int, ignored: list[str]) -> None:
        self.group_size, self.ignored = group_size, ignored

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AwqConfig:
        bits = config.get("bits", config.get("w_bit"))
        if bits not in SUPPORTED_BITS:
            raise ValueError(
                f"quantization_config.bits {bits!r}: AWQ checkpoints of "
                f"{' / '.join(map(str, SUPPORTED_BITS))} bits only are supported"
            )
        group = config.get("group_size", config.get("q_group_size"))
        if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
            raise ValueError(
                f"quantization_config.group_size must be a positive int, got {group!r}"
            )
        if not config.get("zero_point", True):
            raise ValueError(
                "quantization_config.zero_point false: AWQ without zero points is not supported"
            )
        version = str(config.get("version", "gemm")).lower()
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"quantization_config.version {version!r}: splitserve loads AutoAWQ's "
                f"{' / '.join(SUPPORTED_VERSIONS)} layout only"
            )
        return cls(group, list(config.get("modules_to_not_convert") or []))

    def linear_method(self, layer: Linear, checkpoint_names: list[str]) -> LinearMethod | None:
        if ignored_layer(self.name, checkpoint_names, self.ignored):
            return None
        return AwqLinearMethod(self.group_size)

    def moe_method(self, experts: MoEExperts, name: str) -> MoEExpertsMethod | None:
        if ignored_layer(self.name, [name], self.ignored):
            return None
        return Int4MoEMethod(AwqLinearMethod(self.group_size))
