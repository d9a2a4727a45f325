"""SwiGLU MoE experts on the grouped GEMM (`grouped_gemm.py`), in either row layout.

- contiguous (prefill, many tokens): `moe_align` sorts the (token, slot) pairs by expert on the
  device and pads each expert's run to the row tile; the tokens' rows are gathered in that
  order, the two projections run as contiguous grouped GEMMs, and each pair's output row,
  scaled by its routing weight, goes back to its (token, slot) before the k slots are summed.
- masked (decode, few tokens): each pair gets a row in a [E, T, H] buffer (T = tokens: no
  expert can receive more), its rank among the pairs of its expert; `masked_m` holds the
  counts. Every shape depends on (E, T) only.
Neither layout reads the routing on the host, so both can be captured in a CUDA graph.

Block-scaled FP8 experts (DeepSeek-V3 layout: weight scales per [bn, bk] block) keep their
FP8 stacks: each GEMM's input is quantized per token and per group of bk features, as the
W8A8 linear does (`fp8_scaled_mm.py`), and the grouped GEMM scales each K tile.
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_int, check_same_device
from .activation import silu_and_mul
from .fused_moe import moe_align
from .grouped_gemm import grouped_gemm_contiguous, grouped_gemm_masked
from .reference import fp8_quantize_tokens_ref

CONTIGUOUS_BLOCK_M = 64
"""Row alignment of each expert's run in the contiguous layout (the GEMM's row tile)."""
MASKED_MAX_ROWS = 4096
"""The masked layout is used while experts x tokens stays within this many rows (decode)."""

Fp8Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]
"""(w13 fp8, w13_scale, w2 fp8, w2_scale, block (bn, bk))."""


def choose_layout(num_tokens: int, num_experts: int) -> str:
    """ "masked" for decode-sized batches (E * T rows stay small), else "contiguous"."""
    if num_tokens * num_experts <= MASKED_MAX_ROWS and num_tokens <= 64:
        return "masked"
    return "contiguous"


def contiguous_layout(
    topk_ids: torch.Tensor, num_experts: int, block_m: int = CONTIGUOUS_BLOCK_M
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair_ids int32 [M], m_indices int32 [M]): the row order of the contiguous layout (a
    pair index t * K + j per row, T * K for padding) and each row's expert (-1 for padding).
    M is the worst case for any routing (see `fused_moe.moe_align`)."""
    num_pairs = topk_ids.numel()
    pair_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
    per_row = block_expert.repeat_interleave(block_m)
    m_indices = torch.where(pair_ids < num_pairs, per_row, torch.full_like(per_row, -1))
    return pair_ids, m_indices


def masked_layout(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot int64 [T * K], masked_m int32 [E]): each pair's row e * T + rank in the [E, T, ...]
    masked buffers (rank: its position among its expert's pairs, in pair order), and the
    number of pairs per expert."""
    num_tokens = topk_ids.shape[0]
    flat = topk_ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    order = torch.argsort(flat, stable=True)
    first = counts.cumsum(0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - first[flat[order]]
    rank = torch.empty_like(flat)
    rank[order] = rank_sorted
    return flat * num_tokens + rank, counts.to(torch.int32)


def _quantize(rows: torch.Tensor, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_quantize_tokens_ref(rows, bk)


def _gemm_contiguous(rows, weight, scale, block, m_indices, out_dtype):
    if block is None:
        return grouped_gemm_contiguous(rows, weight, m_indices, block_m=CONTIGUOUS_BLOCK_M)
    rows_q, rows_s = _quantize(rows, block[1])
    return grouped_gemm_contiguous(
        rows_q, weight, m_indices, block_m=CONTIGUOUS_BLOCK_M, out_dtype=out_dtype,
        a_scale=rows_s, b_scale=scale, block=block,
    )  # fmt: skip


def _run_contiguous(x, w13, s13, w2, s2, block, weights, topk_ids):
    num_tokens, hidden = x.shape
    num_pairs = topk_ids.numel()
    top_k = topk_ids.shape[1]
    pair_ids, m_indices = contiguous_layout(topk_ids, w13.shape[0])
    pair_ids = pair_ids.to(torch.int64)
    valid = pair_ids < num_pairs
    tokens = torch.where(valid, pair_ids // top_k, torch.zeros_like(pair_ids))
    rows = x.index_select(0, tokens)
    gate_up = _gemm_contiguous(rows, w13, s13, block, m_indices, x.dtype)
    hidden_states = silu_and_mul(gate_up)
    down = _gemm_contiguous(hidden_states, w2, s2, block, m_indices, x.dtype)
    row_weight = torch.cat([weights, weights.new_zeros(1)])[pair_ids].to(x.dtype)
    # NOTE: padding rows hold unwritten values; they all land in the spare row num_pairs.
    out = torch.zeros(num_pairs + 1, hidden, dtype=x.dtype, device=x.device)
    out.index_copy_(0, pair_ids, down * row_weight[:, None])
    return out[:num_pairs].view(num_tokens, top_k, hidden).sum(dim=1)


def _gemm_masked(buffer, weight, scale, block, masked_m, out_dtype, buffer_scale=None):
    if block is None:
        return grouped_gemm_masked(buffer, weight, masked_m)
    return grouped_gemm_masked(
        buffer, weight, masked_m, out_dtype=out_dtype, a_scale=buffer_scale, b_scale=scale,
        block=block,
    )  # fmt: skip


def _scatter_masked(values, slot, num_experts, num_tokens, fill=0.0):
    buffer = values.new_full((num_experts * num_tokens, values.shape[1]), fill)
    buffer[slot] = values
    return buffer.view(num_experts, num_tokens, -1)


def _run_masked(x, w13, s13, w2, s2, block, weights, topk_ids):
    num_tokens, hidden = x.shape
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    slot, masked_m = masked_layout(topk_ids, num_experts)
    token_rows = x.repeat_interleave(top_k, dim=0)  # pair p = t * K + j reads token t
    dims = (slot, num_experts, num_tokens)
    if block is None:
        gate_up = _gemm_masked(_scatter_masked(token_rows, *dims), w13, None, None, masked_m, None)
    else:
        x_q, x_s = _quantize(x, block[1])
        buf_q = _scatter_masked(x_q.view(torch.uint8).repeat_interleave(top_k, dim=0), *dims)
        buf_s = _scatter_masked(x_s.repeat_interleave(top_k, dim=0), *dims, fill=1.0)
        buf_q = buf_q.view(x_q.dtype)
        gate_up = _gemm_masked(buf_q, w13, s13, block, masked_m, x.dtype, buf_s)
    hidden_states = silu_and_mul(gate_up.view(num_experts * num_tokens, -1))
    if block is None:
        down = _gemm_masked(hidden_states.view(num_experts, num_tokens, -1), w2, None, None, masked_m, None)  # fmt: skip
    else:
        h_q, h_s = _quantize(hidden_states, block[1])
        down = _gemm_masked(
            h_q.view(num_experts, num_tokens, -1), w2, s2, block, masked_m, x.dtype,
            h_s.view(num_experts, num_tokens, -1),
        )  # fmt: skip
    pairs = down.view(num_experts * num_tokens, hidden)[slot] * weights.to(x.dtype)[:, None]
    return pairs.view(num_tokens, top_k, hidden).sum(dim=1)


def grouped_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    layout: str = "auto",
) -> torch.Tensor:
    """SwiGLU experts over their routed tokens on the grouped GEMM, weighted and summed.

    Args:
        x: [T, H] fp16/bf16/fp32; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I];
            topk_weights: float [T, K]; topk_ids: int32/int64 [T, K] in [0, E).
        w13_scale, w2_scale, block: block-scaled FP8 experts: w13 / w2 float8_e4m3fn, scales
            float32 [E, ceil(N / bn), ceil(K / bk)] per stack, block (bn, bk), bk a multiple
            of 32. The inputs of both GEMMs are quantized per token and bk-group.
        layout: "contiguous", "masked" or "auto" (`choose_layout`).

    Returns:
        [T, H] in x.dtype.
    """
    check_float("x", x, 2)
    check_int("topk_ids", topk_ids, 2, (torch.int32, torch.int64))
    check_same_device(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    if w13.shape[2] != hidden or two_inter % 2 or w2.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"expert weights w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x "
            f"{tuple(x.shape)}: expected [E, 2I, {hidden}] and [E, {hidden}, I]"
        )
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
            f"must both be [{num_tokens}, K]"
        )
    if (block is None) != (w13_scale is None) or (block is None) != (w2_scale is None):
        raise ValueError("FP8 experts need w13_scale, w2_scale and block together")
    if layout == "auto":
        layout = choose_layout(num_tokens, num_experts)
    if layout not in ("contiguous", "masked"):
        raise ValueError(f"layout must be 'contiguous', 'masked' or 'auto', got {layout!r}")
    if num_tokens == 0:
        return torch.zeros_like(x)
    run = _run_masked if layout == "masked" else _run_contiguous
    weights = topk_weights.reshape(-1).float()
    return run(x, w13, w13_scale, w2, w2_scale, block, weights, topk_ids)
