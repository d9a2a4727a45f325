"""Rotary position embedding applied in place to q and k.

One program per token rotates all its query and key heads, reading the token's cos/sin row once.
Two layouts: neox rotates the halves (x[:R/2], x[R/2:R]) against each other, gpt-j rotates
interleaved pairs (x[2i], x[2i+1]). Dims past rotary_dim R are left untouched (partial rotary).
The cache is built by `rotary.build_cos_sin_cache` ([max_pos, R]: cos then sin).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_int, check_same_device, next_power_of_2


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, num_heads, cos, sin, half,
    HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr,
):  # fmt: skip
    """Rotate the first 2*half dims of num_heads heads starting at x_ptr, in place."""
    h = tl.arange(0, HEADS_PAD)
    i = tl.arange(0, HALF_PAD)
    mask = (h < num_heads)[:, None] & (i < half)[None, :]
    if IS_NEOX:
        first = i
        second = i + half
    else:
        first = 2 * i
        second = 2 * i + 1
    p1 = x_ptr + h[:, None] * stride_h + first[None, :]
    p2 = x_ptr + h[:, None] * stride_h + second[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, y1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, y2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    # pointers
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    # sizes
    num_q_heads,
    num_k_heads,
    half,
    # strides (elements; the head-dim stride is 1)
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_cache,
    # meta
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    cache_row = cos_sin_ptr + pos * stride_cache
    cos = tl.load(cache_row + i, mask=i < half, other=1.0).to(tl.float32)
    sin = tl.load(cache_row + half + i, mask=i < half, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + t * stride_q_t, stride_q_h, num_q_heads, cos, sin, half,
        Q_HEADS_PAD, HALF_PAD, IS_NEOX,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + t * stride_k_t, stride_k_h, num_k_heads, cos, sin, half,
        K_HEADS_PAD, HALF_PAD, IS_NEOX,
    )  # fmt: skip


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place (Triton); returns them for chaining.

    Args:
        positions: int64 [T] — must be < cos_sin_cache.shape[0] (not checked on device).
        q: [T, Hq, D]; k: [T, Hk, D] — same dtype, head dim contiguous; strided views of a
            fused qkv projection are fine.
        cos_sin_cache: [max_pos, R], R even and <= D; row p = cos(p*f) ++ sin(p*f), already
            multiplied by any attention scaling (yarn mscale).
        is_neox: halves layout (True) or gpt-j interleaved pairs (False).
    """
    check_int("positions", positions, 1, (torch.int64, torch.int32))
    check_float("q", q, 3)
    check_float("k", k, 3)
    check_float("cos_sin_cache", cos_sin_cache, 2)
    check_same_device(positions=positions, q=q, k=k, cos_sin_cache=cos_sin_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    rot = cos_sin_cache.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape[0] != num_tokens:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)} disagree"
        )
    if rot % 2 or rot > head_dim:
        raise ValueError(f"rotary_dim {rot} must be even and <= head_dim {head_dim}")
    if num_tokens:
        half = rot // 2
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_sin_cache,
            num_q_heads, k.shape[1], half,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            Q_HEADS_PAD=next_power_of_2(num_q_heads),
            K_HEADS_PAD=next_power_of_2(k.shape[1]),
            HALF_PAD=next_power_of_2(half),
            IS_NEOX=is_neox,
            num_warps=4,
        )  # fmt: skip
    return q, k
