"""MXFP4 (OCP microscaling FP4) decoding in plain torch: the reference of the MXFP4 MoE kernel
and the CPU path, which dequantizes the experts once at load.

A row of K values is K / 32 blocks; a block is 16 bytes of FP4 (e2m1) codes, value 2j in the
low nibble of byte j and 2j + 1 in the high one, and one E8M0 scale byte s meaning 2^(s - 127).
"""

from __future__ import annotations

import torch

from .torch_moe import fused_moe_torch

BLOCK = 32
"""Values per scale (and per 16-byte block)."""


def e2m1_values(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 16 FP4 (e2m1) values by code: bit 3 sign, bits 2-1 exponent (bias 1), bit 0
    mantissa; exponent 0 is subnormal (0 or 0.5)."""
    codes = torch.arange(16, device=device)
    exp, man = (codes >> 1) & 3, (codes & 1).float()
    magnitude = torch.where(exp == 0, man * 0.5, torch.exp2(exp.float() - 1) * (1 + man / 2))
    return torch.where(codes >= 8, -magnitude, magnitude).to(dtype)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """blocks uint8 [..., N, K / 32, 16] and scales uint8 [..., N, K / 32] -> [..., N, K].

    Computed in float32, where it is exact (an e2m1 value times a power of two) except that
    scales past float32's range flush to zero or overflow to inf, as float32 does.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair: "
            f"expected [..., G, {BLOCK // 2}] and [..., G]"
        )
    lut = e2m1_values(torch.float32, blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., G, 16, 2]
    values = lut[codes].flatten(-2)  # [..., G, 32]
    exponents = (scales.to(torch.int32) - 127).unsqueeze(-1)
    values = values * torch.exp2(exponents.to(torch.float32))
    return values.flatten(-2).to(dtype)


def fused_moe_mxfp4_torch(
    x: torch.Tensor,
    w13_blocks: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """The fused MoE on MXFP4 experts (dequantized to x.dtype first): w13 [E, 2I, H] and w2
    [E, H, I] as blocks [E, N, K / 32, 16] + scales [E, N, K / 32]; kwargs as fused_moe_torch."""
    w13 = dequantize_mxfp4(w13_blocks, w13_scales, x.dtype)
    w2 = dequantize_mxfp4(w2_blocks, w2_scales, x.dtype)
    return fused_moe_torch(x, w13, w2, topk_weights, topk_ids, **kwargs)
