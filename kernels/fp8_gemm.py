"""W8A16 FP8 GEMM: y = x @ dequant(W).T (+ b), the FP8 weight dequantized in the load stage.

The weight stays FP8 (e4m3) in memory, [N, K], with a 2-D scale [ceil(N/bn), ceil(K/bk)]: one
layout covers every FP8 checkpoint format (per-tensor: block (N, K); per-channel: (1, K);
block-wise `weight_block_size`: (bn, bk)). Each K step loads an FP8 tile, widens it to the
activation dtype and feeds tl.dot, so the GEMM reads half (fp16/bf16 weights) or a quarter
(fp32) of the weight bytes — the weight-only path that GPUs without FP8 tensor cores (Ampere)
need, as Marlin-FP8 does. Activations are not quantized, so the result equals x @ W_deq.T up
to the GEMM's summation order.

Triton has no e4m3 type below compute capability 8.9 (Ampere), so there the weight goes in as
its raw bytes (uint8) and the kernel rebuilds each value from its bits (`W_BITS`,
`fp8_bits.e4m3_to_f32`, exact); elsewhere the load widens the FP8 type itself.

When a scale block spans whole K tiles (`bk % BLOCK_K == 0`: per-tensor, per-channel, and
block-wise with 128-wide blocks), the scale is applied to the tile's partial product instead
of to every weight (one multiply per output per tile); otherwise each weight element gets its
own gathered scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    FP8_E4M3_BYTES,
    cdiv,
    check_fp8_weight,
    check_same_device,
    dot_precision,
    fp8_operand,
)
from .fp8_bits import e4m3_to_f32


@triton.jit
def _fp8_w8a16_kernel(
    # pointers
    out_ptr,
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    # sizes
    M,
    N,
    K,
    scale_bn,
    scale_bk,
    # strides (the K axis of x and w, the N axis of out are contiguous)
    stride_om,
    stride_xm,
    stride_wn,
    stride_sn,
    # meta
    HAS_BIAS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    W_BITS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    scale_rows = scale_ptr + (offs_n // scale_bn).to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_mask = mask_k[:, None] & mask_n[None, :]
        # [BLOCK_K, BLOCK_N] view of W.T
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + k[:, None], mask=w_mask)
        if W_BITS:
            w = e4m3_to_f32(w)
        if SCALE_PER_TILE:
            s = tl.load(scale_rows + k0 // scale_bk, mask=mask_n, other=0.0)
            # e4m3 widens exactly to fp16 / bf16 / fp32
            part = tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
            acc += part * s[None, :]
        else:
            s = tl.load(scale_rows[None, :] + (k // scale_bk)[:, None], mask=w_mask, other=0.0)
            acc += tl.dot(x, (w.to(tl.float32) * s).to(x.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _block_sizes(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): a decode shape (few rows) takes narrow M tiles."""
    if m <= 16:
        return 16, 64, 128
    if m <= 64:
        return 64, 64, 64
    return 128, 128, 64


def fp8_w8a16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    weight_bits: bool | None = None,
) -> torch.Tensor:
    """x @ dequant(weight).T + bias (Triton).

    Args:
        x: [..., K] fp32/fp16/bf16, last dim contiguous.
        weight: float8_e4m3fn [N, K], contiguous.
        scale: float32 [ceil(N / bn), ceil(K / bk)]: weight[n, k] * scale[n // bn, k // bk]
            is the real weight.
        block: (bn, bk).
        bias: [N] or None.
        weight_bits: decode the weight from its bytes in the kernel; None: where Triton has
            no e4m3 type (CUDA below capability 8.9, `_checks.fp8_operand`).

    Returns:
        [..., N] in x.dtype.
    """
    n, k = check_fp8_weight(x, weight, scale, block)
    if weight_bits is None:
        weight_bits = fp8_operand(weight)[1] == FP8_E4M3_BYTES
    bn, bk = block
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, scale=scale, bias=bias)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    scale = scale.to(torch.float32).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m, block_n, block_k = _block_sizes(m)
        grid = (cdiv(m, block_m), cdiv(n, block_n))
        _fp8_w8a16_kernel[grid](
            out, x2, weight.view(torch.uint8) if weight_bits else weight, scale,
            bias if bias is not None else out,
            m, n, k, bn, bk,
            out.stride(0), x2.stride(0), weight.stride(0), scale.stride(0),
            HAS_BIAS=bias is not None,
            SCALE_PER_TILE=bk % block_k == 0,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            PRECISION=dot_precision(x.dtype),
            W_BITS=weight_bits,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
