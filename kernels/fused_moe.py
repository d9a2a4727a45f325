"""Fused MoE: SwiGLU experts over their routed tokens, grouped GEMMs with no host sync.

Every (token, slot) pair of the routing is one row of work. `moe_align` sorts the pairs by
expert on the device and pads each expert's run to a multiple of BLOCK_M, so each program's
BLOCK_M rows share one expert; blocks past the padded total (sized for the worst case, so the
grid never depends on the routing) and padding rows do nothing. Two launches of one kernel do
the two projections: gate_up (rows gathered from the tokens) and down (rows of the
activation, scaled by the routing weight); the k rows of a token are then summed. Experts
that received no token get no block. No host sync or routing-dependent shape: a decode step
can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import cdiv, check_float, check_int, check_same_device, dot_precision
from .activation import silu_and_mul
from .torch_ops import clamped_swiglu

BLOCK_M = 16  # tl.dot needs M >= 16
BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def _fused_moe_kernel(
    # pointers
    out_ptr,
    a_ptr,
    w_ptr,
    bias_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    topk_weights_ptr,
    # sizes
    N,
    K,
    num_pairs,
    top_k,
    num_experts,
    # strides (the last axis of a, w and out is contiguous)
    stride_am,
    stride_we,
    stride_wn,
    stride_be,
    stride_om,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_BY_TOKEN: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < num_experts:  # blocks past the padded total have no expert
        pairs = tl.load(pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs  # padding rows carry num_pairs
        rows = tl.where(valid, pairs // top_k if A_BY_TOKEN else pairs, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        w_base = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            a = tl.load(
                a_ptr + rows[:, None] * stride_am + (k0 + offs_k)[None, :],
                mask=valid[:, None] & k_mask[None, :],
                other=0.0,
            )
            w = tl.load(
                w_base + (k0 + offs_k)[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            acc += tl.dot(a, w, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + offs_n, mask=n_mask)
            acc += bias.to(tl.float32)[None, :]
        if MUL_WEIGHT:
            scale = tl.load(topk_weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
            acc = acc * scale[:, None]
        out_rows = tl.where(valid, pairs, 0).to(tl.int64)
        tl.store(
            out_ptr + out_rows[:, None] * stride_om + offs_n[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=valid[:, None] & n_mask[None, :],
        )


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to a multiple of block_m (on device).

    Args:
        topk_ids: int [T, K], experts in [0, num_experts).

    Returns:
        pair_ids int32 [NB * block_m]: a pair index t * K + j per row, T * K for padding;
        block_expert int32 [NB]: the expert of each block, num_experts past the last run.
        NB = cdiv(T * K + E * (block_m - 1), block_m), the worst case for any routing.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    first = counts.cumsum(0) - counts  # each expert's first position in `order`
    dest = (ends - padded)[expert_of] + torch.arange(num_pairs, device=flat.device)
    dest -= first[expert_of]
    num_blocks = cdiv(num_pairs + num_experts * (block_m - 1), block_m)
    pair_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=flat.device)
    pair_ids[dest] = order.to(torch.int32)
    starts = torch.arange(num_blocks, device=flat.device, dtype=torch.int64) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True).to(torch.int32)
    return pair_ids, block_expert


def _grouped_gemm(
    out: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    pair_ids: torch.Tensor,
    block_expert: torch.Tensor,
    topk_weights: torch.Tensor,
    top_k: int,
    a_by_token: bool,
    mul_weight: bool,
    bias: torch.Tensor | None = None,
) -> None:
    num_pairs = topk_weights.numel()
    n, k = w.shape[1], w.shape[2]
    grid = (block_expert.numel(), cdiv(n, BLOCK_N))
    _fused_moe_kernel[grid](
        out, a, w, bias if bias is not None else w, pair_ids, block_expert, topk_weights,
        n, k, num_pairs, top_k, w.shape[0],
        a.stride(0), w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0,
        out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        A_BY_TOKEN=a_by_token, MUL_WEIGHT=mul_weight, HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(a.dtype),
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
) -> torch.Tensor:
    """SwiGLU experts over their routed tokens, weighted and summed per token (Triton).

    Args:
        x: [T, H]; w13: [E, 2I, H] (each expert's gate rows, then its up rows);
        w2: [E, H, I]; topk_weights: float [T, K]; topk_ids: int32/int64 [T, K] in [0, E).
        b13 [E, 2I], b2 [E, H]: optional per-expert biases (b2 before the routing weight);
        swiglu_limit: gpt-oss's clamped SwiGLU (`torch_ops.clamped_swiglu`) instead of SiLU.

    Returns:
        [T, H] in x.dtype.
    """
    check_float("x", x, 2)
    check_float("w13", w13, 3)
    check_float("w2", w2, 3)
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
    _check_biases(b13, b2, num_experts, two_inter, hidden)
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    weights = topk_weights.reshape(-1).contiguous()
    pair_ids, block_expert = moe_align(topk_ids, num_experts)
    gate_up = torch.empty(num_tokens * top_k, two_inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(gate_up, x, w13, pair_ids, block_expert, weights, top_k, True, False, b13)
    if swiglu_limit is None:
        hidden_states = silu_and_mul(gate_up)
    else:
        hidden_states = clamped_swiglu(gate_up, swiglu_alpha, swiglu_limit).contiguous()
    down = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(down, hidden_states, w2, pair_ids, block_expert, weights, top_k, False, True, b2)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)


def _check_biases(
    b13: torch.Tensor | None, b2: torch.Tensor | None, experts: int, two_inter: int, hidden: int
) -> None:
    for name, bias, shape in (("b13", b13, (experts, two_inter)), ("b2", b2, (experts, hidden))):
        if bias is not None and (tuple(bias.shape) != shape or bias.stride(-1) != 1):
            raise ValueError(
                f"{name} must be a contiguous-row {list(shape)} bias, got {tuple(bias.shape)}"
            )
