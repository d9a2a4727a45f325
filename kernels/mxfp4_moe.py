"""Fused MoE on MXFP4 experts: the grouped GEMMs of `fused_moe.py` with the expert weights
decoded from FP4 in the load stage, so they are read at 0.53 bytes a value.

Routing is `fused_moe.moe_align` (pairs sorted by expert on the device, each expert's run
padded to BLOCK_M; no host sync). Weights are blocks uint8 [E, N, K / 2] (the checkpoint's
[E, N, K / 32, 16] flattened: value 2j of a row in the low nibble of byte j, 2j + 1 in the high
one) and scales uint8 [E, N, K / 32] (E8M0: 2^(s - 127) per 32 values). A K step of the GEMM
loads BLOCK_K / 2 bytes per output column, decodes the low nibbles into the even-k tile and
the high nibbles into the odd-k one, multiplies in the block's scale (built from its bits,
exact), and runs two dots against the even and odd columns of the activations: no nibble
interleaving in registers. The reference is `torch_mxfp4.fused_moe_mxfp4_torch`.

NOTE: weights are decoded to the activation dtype before the dot; in float16 a scale past
2^15 overflows (gpt-oss checkpoints serve in bfloat16, whose range is float32's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import cdiv, check_float, check_int, check_same_device, dot_precision
from .activation import silu_and_mul
from .fused_moe import BLOCK_M, _check_biases, moe_align
from .torch_ops import clamped_swiglu

BLOCK_N = 64
BLOCK_K = 64  # values per K step: two E8M0 groups, 32 bytes per output column
GROUP = 32


@triton.jit
def _e2m1(code):
    """FP4 code (int32, 0..15) -> float32 value: sign bit 3, exponent bits 2-1, mantissa 0."""
    exp = ((code >> 1) & 3).to(tl.float32)
    man = (code & 1).to(tl.float32)
    magnitude = tl.where(exp == 0.0, 0.5 * man, tl.exp2(exp - 1.0) * (1.0 + 0.5 * man))
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def _mxfp4_moe_kernel(
    # pointers
    out_ptr,
    a_ptr,
    blocks_ptr,
    scales_ptr,
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
    # strides (the last axis of a, w, s and out is contiguous)
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
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
        offs_b = tl.arange(0, BLOCK_K // 2)  # bytes of one K step
        e64 = expert.to(tl.int64)
        w_base = blocks_ptr + e64 * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        s_base = scales_ptr + e64 * stride_se + offs_n.to(tl.int64)[None, :] * stride_sn
        a_rows = a_ptr + rows[:, None] * stride_am
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b0 in range(0, K // 2, BLOCK_K // 2):
            byte = b0 + offs_b
            b_mask = byte < K // 2
            wb_mask = b_mask[:, None] & n_mask[None, :]
            packed = tl.load(w_base + byte[:, None], mask=wb_mask, other=0).to(tl.int32)
            # NOTE: 16 bytes (32 values) share one scale; a literal, as kernels read no globals
            s = tl.load(s_base + (byte // 16)[:, None], mask=wb_mask, other=127)
            s = s.to(tl.int32)
            # 2^(s - 127) from its float32 bits (exact); s = 0 is the subnormal 2^-127
            scale = tl.where(s == 0, 0x400000, s << 23).to(tl.float32, bitcast=True)
            w_even = (_e2m1(packed & 15) * scale).to(a_ptr.dtype.element_ty)
            w_odd = (_e2m1(packed >> 4) * scale).to(a_ptr.dtype.element_ty)
            a_mask = valid[:, None] & b_mask[None, :]
            a_even = tl.load(a_rows + 2 * byte[None, :], mask=a_mask, other=0.0)
            a_odd = tl.load(a_rows + 2 * byte[None, :] + 1, mask=a_mask, other=0.0)
            acc += tl.dot(a_even, w_even, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            acc += tl.dot(a_odd, w_odd, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + e64 * stride_be + offs_n, mask=n_mask)
            acc += bias.to(tl.float32)[None, :]
        if MUL_WEIGHT:
            weight = tl.load(topk_weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
            acc = acc * weight[:, None]
        out_rows = tl.where(valid, pairs, 0).to(tl.int64)
        tl.store(
            out_ptr + out_rows[:, None] * stride_om + offs_n[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=valid[:, None] & n_mask[None, :],
        )


def mxfp4_grouped_gemm(
    out: torch.Tensor,
    a: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    pair_ids: torch.Tensor,
    block_expert: torch.Tensor,
    topk_weights: torch.Tensor,
    top_k: int,
    a_by_token: bool,
    mul_weight: bool,
    bias: torch.Tensor | None = None,
) -> None:
    """out[p] = a[row(p)] @ dequant(expert(p)).T (+ bias) (* weight[p]) for every routed pair p.

    Args:
        out: [P, N]; a: [T, K] (rows by token when a_by_token, else by pair);
        blocks: uint8 [E, N, K / 32, 16]; scales: uint8 [E, N, K / 32]; pair_ids, block_expert:
        from `moe_align`; topk_weights: float [P]; bias: [E, N] or None.
    """
    num_experts, n, groups = scales.shape
    k = groups * GROUP
    if blocks.shape != (num_experts, n, groups, GROUP // 2) or blocks.dtype != torch.uint8:
        raise ValueError(
            f"MXFP4 blocks must be uint8 [{num_experts}, {n}, {groups}, {GROUP // 2}] to match "
            f"scales {tuple(scales.shape)}, got {blocks.dtype} {tuple(blocks.shape)}"
        )
    if scales.dtype != torch.uint8 or a.shape[1] != k or a.stride(1) != 1:
        raise ValueError(
            f"activations {tuple(a.shape)} (contiguous rows) must have K = {k}, the blocks' "
            f"32 * {groups}; scales must be uint8, got {scales.dtype}"
        )
    w = blocks.reshape(num_experts, n, k // 2)
    grid = (block_expert.numel(), cdiv(n, BLOCK_N))
    _mxfp4_moe_kernel[grid](
        out, a, w, scales, bias if bias is not None else scales, pair_ids, block_expert,
        topk_weights,
        n, k, topk_weights.numel(), top_k, num_experts,
        a.stride(0), w.stride(0), w.stride(1), scales.stride(0), scales.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        A_BY_TOKEN=a_by_token, MUL_WEIGHT=mul_weight, HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(a.dtype),
    )  # fmt: skip


def fused_moe_mxfp4(
    x: torch.Tensor,
    w13_blocks: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
) -> torch.Tensor:
    """Experts over their routed tokens with MXFP4 weights, weighted and summed per token.

    Args:
        x: [T, H] (H a multiple of 32); w13_blocks uint8 [E, 2I, H / 32, 16] and w13_scales
        uint8 [E, 2I, H / 32] (gate rows, then up rows); w2_blocks [E, H, I / 32, 16] and
        w2_scales [E, H, I / 32]; topk_weights float [T, K]; topk_ids int [T, K] in [0, E);
        b13 [E, 2I], b2 [E, H]: optional biases; swiglu_limit: gpt-oss's clamped SwiGLU.

    Returns:
        [T, H] in x.dtype.
    """
    check_float("x", x, 2)
    check_int("topk_ids", topk_ids, 2, (torch.int32, torch.int64))
    check_same_device(x=x, w13=w13_blocks, w2=w2_blocks, topk_weights=topk_weights, ids=topk_ids)
    num_tokens, hidden = x.shape
    num_experts, two_inter = w13_scales.shape[:2]
    inter = two_inter // 2
    if (
        w13_scales.shape != (num_experts, two_inter, hidden // GROUP)
        or hidden % GROUP
        or two_inter % 2
        or w2_scales.shape != (num_experts, hidden, inter // GROUP)
        or inter % GROUP
    ):
        raise ValueError(
            f"MXFP4 scales w13 {tuple(w13_scales.shape)} and w2 {tuple(w2_scales.shape)} do not "
            f"fit x {tuple(x.shape)}: expected [E, 2I, {hidden} / 32] and [E, {hidden}, I / 32] "
            "with H and I multiples of 32"
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
    x = x.contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    pair_ids, block_expert = moe_align(topk_ids, num_experts)
    gate_up = torch.empty(num_tokens * top_k, two_inter, dtype=x.dtype, device=x.device)
    mxfp4_grouped_gemm(
        gate_up, x, w13_blocks, w13_scales, pair_ids, block_expert, weights, top_k, True, False, b13
    )
    if swiglu_limit is None:
        hidden_states = silu_and_mul(gate_up)
    else:
        hidden_states = clamped_swiglu(gate_up, swiglu_alpha, swiglu_limit).contiguous()
    down = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    mxfp4_grouped_gemm(
        down, hidden_states, w2_blocks, w2_scales, pair_ids, block_expert, weights, top_k,
        False, True, b2,
    )  # fmt: skip
    return down.view(num_tokens, top_k, hidden).sum(dim=1)
