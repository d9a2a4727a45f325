"""W4A16 int4 GEMM: y = x @ dequant(W).T (+ b), the 4-bit weight unpacked in the load stage.

The weight is held packed along K, int32 [K / 8, N] (bits 4j..4j+3 of word [r, n] are the
unsigned value q[n, 8r + j], `reference.int4_pack_k`), with per-group scales and zero points
[K / g, N] in the activation dtype: the real weight is (q - zero) * scale. AWQ and
compressed-tensors `pack-quantized` checkpoints are both repacked into it at load. A row of the
packed tensor is contiguous over N, so a tile's [BLOCK_K / 8, BLOCK_N] words load coalesced,
each once, and are spread over the tile's K rows in registers (shift, mask, reshape); a K tile
reads a quarter of the bytes of an fp16 weight tile.

Each K step unpacks its tile to (q - zero), which is exact in fp16 / bf16 / fp32, and feeds
tl.dot; the scale multiplies the tile's partial product when a group spans whole K tiles
(`group % BLOCK_K == 0`), else each weight before the dot. Accumulation is fp32.

Two shapes of launch: prefill (many rows) tiles M and N only; decode (M <= 16) has few output
tiles, so it also splits K over `split_k` programs that write fp32 partial sums, added up after
(deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import cdiv, check_float, check_int, check_same_device, dot_precision

DECODE_MAX_M = 16
"""Up to this many rows the launch takes the decode shape (narrow M tiles, split K)."""
_TARGET_PROGRAMS = 256
"""Decode: split K until about this many programs run (enough to fill a large GPU)."""


@triton.jit
def _w4a16_kernel(
    # pointers
    out_ptr,
    x_ptr,
    qw_ptr,
    scale_ptr,
    zero_ptr,
    bias_ptr,
    # sizes
    M,
    N,
    K,
    group,
    k_per_split,
    # strides (the K axis of x, the N axis of qweight / scales / zeros / out are contiguous)
    stride_os,
    stride_om,
    stride_xm,
    stride_qk,
    stride_sk,
    # meta
    HAS_BIAS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_words = tl.arange(0, BLOCK_K // 8)
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_mask = mask_k[:, None] & mask_n[None, :]
        # NOTE: K tiles start on multiples of BLOCK_K and k_end is a multiple of 8 (K % 8 == 0),
        # so a tile is whole words: load each word once, then spread its 8 nibbles over 8 rows.
        words = k0 // 8 + offs_words
        packed = tl.load(
            qw_ptr + words[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
            mask=(words * 8 < k_end)[:, None] & mask_n[None, :],
            other=0,
        )  # [BLOCK_K / 8, BLOCK_N]
        nibbles = (packed[:, None, :] >> shifts) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
        q = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)).to(tl.float32)  # row 8w + j: nibble j of w
        if SCALE_PER_TILE:
            row = (k0 // group).to(tl.int64) * stride_sk
            s = tl.load(scale_ptr + row + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + row + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            # NOTE: rows past K hold x == 0, so their (q - z) need no mask.
            part = tl.dot(x, (q - z[None, :]).to(x.dtype), input_precision=PRECISION)
            acc += part * s[None, :]
        else:
            rows = (k // group)[:, None].to(tl.int64) * stride_sk + offs_n[None, :]
            s = tl.load(scale_ptr + rows, mask=w_mask, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + rows, mask=w_mask, other=0.0).to(tl.float32)
            acc += tl.dot(x, ((q - z) * s).to(x.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        if pid_k == 0:  # the bias goes into one partial sum of a split K
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr
        + pid_k.to(tl.int64) * stride_os
        + offs_m[:, None].to(tl.int64) * stride_om
        + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _block_k(group: int, k: int) -> int:
    """The largest of 128 / 64 / 32 that divides the group (scale per K tile), else 64."""
    for block in (128, 64, 32):
        if group % block == 0 and block <= max(k, 32):
            return block
    return 64


def launch_shape(m: int, n: int, k: int, group: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, split_k) the launcher picks for these sizes."""
    block_k = _block_k(group, k)
    if m > DECODE_MAX_M:
        if m <= 64:
            return 64, 64, min(block_k, 64), 1
        return 128, 128, min(block_k, 64), 1
    tiles = cdiv(n, 64)
    split = max(1, min(cdiv(k, block_k), cdiv(_TARGET_PROGRAMS, tiles)))
    return 16, 64, block_k, split


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """x @ dequant(W).T + bias (Triton).

    Args:
        x: [..., K] fp32/fp16/bf16, last dim contiguous; K % 8 == 0.
        qweight: int32 [K / 8, N] (`reference.int4_pack_k`), contiguous.
        scales, zeros: [ceil(K / group), N] (zeros: integers 0..15, 8 when symmetric); cast to
            x.dtype.
        group: the group size along K.
        bias: [N] or None.
        split_k: how many programs share each output tile's K loop (None: the launcher picks
            by shape; always 1 above DECODE_MAX_M rows).

    Returns:
        [..., N] in x.dtype.
    """
    check_float("x", x, x.dim())
    check_int("qweight", qweight, 2, (torch.int32,))
    k = x.shape[-1]
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"qweight must be [{k // 8}, N] for x with {k} features (K % 8 == 0)")
    if group <= 0:
        raise ValueError(f"group must be positive, got {group}")
    groups = cdiv(k, group)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (groups, n):
            raise ValueError(f"{name} must be [{groups}, {n}], got {tuple(t.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    check_same_device(x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qweight = qweight.contiguous()
    scales = scales.to(x.dtype).contiguous()
    zeros = zeros.to(x.dtype).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    block_m, block_n, block_k, split = launch_shape(m, n, k, group)
    if split_k is not None and m <= DECODE_MAX_M:
        split = split_k
    k_per_split = cdiv(cdiv(k, block_k), split) * block_k
    split = cdiv(k, k_per_split)
    dest = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (cdiv(m, block_m), cdiv(n, block_n), split)
    _w4a16_kernel[grid](
        dest, x2, qweight, scales, zeros, bias if bias is not None else out,
        m, n, k, group, k_per_split,
        dest.stride(0) if split > 1 else 0, dest.stride(-2), x2.stride(0),
        qweight.stride(0), scales.stride(0),
        HAS_BIAS=bias is not None,
        SCALE_PER_TILE=group % block_k == 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    if split > 1:
        out.copy_(dest.sum(dim=0))
    return out.view(*x.shape[:-1], n)
