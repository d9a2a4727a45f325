"""Plain-torch references of the grouped GEMM (`grouped_gemm.py`) and of the MoE built on it.

Each group's rows go through one matmul in fp32 (FP8 operands dequantized first: the products
of FP8 values are exact in fp32, so only the summation order differs from the kernel), then are
rounded to the output dtype. Padding rows of the contiguous layout and rows past a group's
count in the masked layout come back as zeros (the kernel leaves them unwritten).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import fp8_dequantize_ref, fp8_quantize_tokens_ref
from .torch_moe import fused_moe_torch


def _dequant_rows(a: torch.Tensor, a_scale: torch.Tensor | None, bk: int) -> torch.Tensor:
    if a_scale is None:
        return a.float()
    k = a.shape[-1]
    return a.float() * a_scale.float().repeat_interleave(bk, dim=-1)[..., :k]


def _dequant_groups(b: torch.Tensor, b_scale: torch.Tensor | None, block) -> torch.Tensor:
    if b_scale is None:
        return b.float()
    return torch.stack([fp8_dequantize_ref(b[g], b_scale[g], block) for g in range(b.shape[0])])


def grouped_gemm_contiguous_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    m_indices: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """out[r] = a[r] @ b[m_indices[r]].T; rows with m_indices -1 are zero. Shapes as
    `grouped_gemm.grouped_gemm_contiguous`."""
    a_f = _dequant_rows(a, a_scale, block[1] if block else 1)
    b_f = _dequant_groups(b, b_scale, block)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for g in range(b.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            out[rows] = a_f[rows] @ b_f[g].T
    return out.to(out_dtype or a.dtype)


def grouped_gemm_masked_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """out[g, i] = a[g, i] @ b[g].T for i < masked_m[g], zero past it. Shapes as
    `grouped_gemm.grouped_gemm_masked`."""
    a_f = _dequant_rows(a, a_scale, block[1] if block else 1)
    b_f = _dequant_groups(b, b_scale, block)
    out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
    for g, count in enumerate(masked_m.tolist()):
        out[g, :count] = a_f[g, :count] @ b_f[g].T
    return out.to(out_dtype or a.dtype)


def fused_moe_fp8_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    block: tuple[int, int],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The block-scaled FP8 MoE as the grouped path computes it: the experts' inputs quantized
    per token and per group of bk features (W8A8), both projections in fp32 on the dequantized
    operands, SiLU-and-mul between, weighted sum per token. In x.dtype.

    Args:
        w13: float8_e4m3fn [E, 2I, H], w13_scale [E, ceil(2I / bn), ceil(H / bk)];
        w2: float8_e4m3fn [E, H, I], w2_scale [E, ceil(H / bn), ceil(I / bk)]; block (bn, bk).
    """
    bk = block[1]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            x_q, x_s = fp8_quantize_tokens_ref(x[t : t + 1], bk)
            gate_up = F.linear(
                _dequant_rows(x_q, x_s, bk), fp8_dequantize_ref(w13[e], w13_scale[e], block)
            ).to(x.dtype)
            inter = gate_up.shape[-1] // 2
            hidden = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).to(x.dtype)
            h_q, h_s = fp8_quantize_tokens_ref(hidden, bk)
            down = F.linear(
                _dequant_rows(h_q, h_s, bk), fp8_dequantize_ref(w2[e], w2_scale[e], block)
            ).to(x.dtype)
            out[t] += float(topk_weights[t, j]) * down[0].float()
    return out.to(x.dtype)


def fused_moe_fp8_weight_only_torch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    block: tuple[int, int],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The torch path for FP8 experts off the Triton backend: dequantize the stacks, then the
    grouped torch MoE (weight-only; what a CPU worker computes after its load-time
    dequantization)."""
    d13 = _dequant_groups(w13, w13_scale, block).to(x.dtype)
    d2 = _dequant_groups(w2, w2_scale, block).to(x.dtype)
    return fused_moe_torch(x, d13, d2, topk_weights, topk_ids)
