"""MXFP4 checkpoints (quant_method "mxfp4", gpt-oss): MoE expert weights in the OCP
microscaling FP4 format; every other layer is unquantized.

Layout (per projection of the stacked experts, rows = outputs, as the checkpoint stores them):
`{proj}_blocks` uint8 [E, N, K / 32, 16]: 32 FP4 (e2m1) values of one row per block of 16
bytes, element 2j in the low nibble of byte j, element 2j + 1 in the high one; `{proj}_scales`
uint8 [E, N, K / 32]: one E8M0 exponent per 32 values, the block's values times 2^(s - 127).
gate_up_proj is N = 2I rows interleaved gate / up (see models/gpt_oss.py); the loader puts the
gate rows first, as every MoE here expects, by permuting whole rows of blocks and scales.

Where it runs: on CUDA with Triton the experts stay packed and the grouped GEMM decodes the
blocks in its load stage (`kernels/mxfp4_moe.py`, 0.53 bytes a weight). Elsewhere (CPU) the
stacks are dequantized once after loading into the compute dtype: 4 bytes a weight in float32
(7.5x the packed size), 2 in bfloat16 (3.8x), traded for the plain fused-MoE path with no
per-step decode; the packed tensors are freed, so the peak is one layer's packed copy over
the dense model. Outputs then equal the model on its dequantized weights (weight-only: the
activations are never quantized).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from splitserve.kernels.torch_mxfp4 import BLOCK, dequantize_mxfp4
from splitserve.worker.linear import Linear, LinearMethod, default_weight_loader, set_weight_attrs
from splitserve.worker.moe import MoEExperts, MoEExpertsMethod
from splitserve.worker.quantization import QuantConfig

PROJECTIONS = ("gate_up_proj", "down_proj")


class Mxfp4MoEMethod(MoEExpertsMethod):
    """gpt-oss experts as `{proj}_blocks` + `{proj}_scales` (see the module docstring)."""

    checkpoint_params: ClassVar[dict[str, str]] = {}
    """No per-expert checkpoint tensors: MXFP4 experts come stacked."""

    def create_weights(self, experts: MoEExperts) -> None:
        e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
        shapes = {"gate_up_proj": (e, 2 * i, h // BLOCK), "down_proj": (e, h, i // BLOCK)}
        for proj, shape in shapes.items():
            blocks = torch.empty(*shape, BLOCK // 2, dtype=torch.uint8)
            scales = torch.empty(*shape, dtype=torch.uint8)
            setattr(experts, f"{proj}_blocks", nn.Parameter(blocks, requires_grad=False))
            setattr(experts, f"{proj}_scales", nn.Parameter(scales, requires_grad=False))
            loader = self._loader(experts, interleaved=proj == "gate_up_proj")
            for suffix in ("_blocks", "_scales"):
                set_weight_attrs(experts, proj + suffix, weight_loader=loader)
        experts.packed = True

    @staticmethod
    def _loader(experts: MoEExperts, interleaved: bool):
        def load(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
            if loaded.dtype != torch.uint8 and not loaded.is_meta:  # preflight: shapes only
                raise ValueError(f"has dtype {loaded.dtype}, MXFP4 blocks and scales are uint8")
            if param.shape != loaded.shape:
                raise ValueError(
                    f"has shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}"
                )
            if interleaved and getattr(experts, "interleaved_gate_up", False):
                loaded = torch.cat([loaded[:, 0::2], loaded[:, 1::2]], dim=1)
            default_weight_loader(param, loaded, shard_id)

        return load

    def process_weights_after_loading(self, experts: MoEExperts) -> None:
        if self.keeps_packed(experts):
            return
        dtype = experts.down_proj_bias.dtype if hasattr(experts, "down_proj_bias") else None
        dtype = dtype or torch.get_default_dtype()
        for proj in PROJECTIONS:
            blocks = getattr(experts, f"{proj}_blocks")
            scales = getattr(experts, f"{proj}_scales")
            dense = dequantize_mxfp4(blocks.data, scales.data, dtype)
            delattr(experts, f"{proj}_blocks")
            delattr(experts, f"{proj}_scales")
            setattr(experts, proj, nn.Parameter(dense, requires_grad=False))
        experts.packed = False

    @staticmethod
    def keeps_packed(experts: MoEExperts) -> bool:
        """Whether the experts run packed (CUDA with Triton) rather than dequantized."""
        from splitserve.kernels import dispatch

        device = experts.gate_up_proj_blocks.device
        return dispatch.mxfp4_moe_available(device)

    def apply(
        self,
        experts: Any,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        from splitserve.kernels import dispatch

        extra = dict(
            b13=experts.gate_up_proj_bias,
            b2=experts.down_proj_bias,
            swiglu_limit=experts.swiglu_limit,
            swiglu_alpha=experts.swiglu_alpha,
        )
        if not experts.packed:
            return dispatch.fused_moe(
                x, experts.gate_up_proj, experts.down_proj, topk_weights, topk_ids, **extra
            )
        return dispatch.fused_moe_mxfp4(
            x,
            experts.gate_up_proj_blocks,
            experts.gate_up_proj_scales,
            experts.down_proj_blocks,
            experts.down_proj_scales,
            topk_weights,
            topk_ids,
            **extra,
        )


def not_converted(name: str, patterns: list[str]) -> bool:
    """Whether module `name` is left unquantized by `modules_to_not_convert`: a pattern names
    it, or a module above it, from the start (`*` standing for any characters, so
    "model.layers.*.mlp.experts" names every layer's experts), or is a suffix of it after a
    dot."""
    for pattern in patterns:
        regex = ".*".join(re.escape(part) for part in pattern.split("*"))
        if re.match(rf"{regex}(\.|$)", name) or name.endswith("." + pattern):
            return True
    return False


class Mxfp4Config(QuantConfig):
    """quant_method "mxfp4": MoE experts in MXFP4, except those `modules_to_not_convert` names;
    every linear layer unquantized (gpt-oss lists attention, router, embeddings and lm_head
    there)."""

    name: ClassVar[str] = "mxfp4"

    def __init__(self, modules_to_not_convert: list[str] | None = None) -> None:
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Mxfp4Config:
        ignored = config.get("modules_to_not_convert")
        if ignored is not None and not isinstance(ignored, list):
            raise ValueError(f"mxfp4 modules_to_not_convert must be a list, got {ignored!r}")
        return cls(ignored)

    def linear_method(self, layer: Linear, checkpoint_names: list[str]) -> LinearMethod | None:
        return None

    def moe_method(self, experts: nn.Module, name: str) -> MoEExpertsMethod | None:
        if not_converted(name, self.modules_to_not_convert):
            return None  # saved unquantized: the plain stacks
        if not getattr(experts, "interleaved_gate_up", False):
            raise ValueError(
                f"mxfp4 quantization of MoE experts ({name}) is supported for gpt-oss "
                "(GptOssForCausalLM) only"
            )
        for what, size in (("hidden_size", experts.hidden_size),
                           ("intermediate_size", experts.intermediate_size)):  # fmt: skip
            if size % BLOCK:
                raise ValueError(
                    f"mxfp4 experts ({name}) need {what} a multiple of {BLOCK}, got {size}"
                )
        return Mxfp4MoEMethod()
