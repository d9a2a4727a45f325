"""W8A8 FP8 scaled GEMM: y = (x_q * sx) @ (W * sw).T (+ b), both operands FP8 (e4m3) into
tl.dot, for GPUs with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper).

The activations are quantized on the fly per token (`reference.fp8_quantize_tokens_ref`), or
with the checkpoint's static per-tensor scale (`reference.fp8_quantize_static_ref`), the
weight keeps its checkpoint scales in the layout every FP8 format reduces to,
[ceil(N / bn), ceil(K / bk)] with a block (bn, bk) (see `fp8_gemm.py`). Two scalings:
- per-token x per-channel (also per-tensor): the weight's scale block spans K, so one scale a
  token and one an output column; the tile loop accumulates raw FP8 products and the two scales
  multiply the fp32 accumulator once at the end;
- block-scaled (DeepSeek-V3 / Qwen3-FP8, 128x128 weight blocks): the activation is quantized
  per token and per group of bk features, so each K tile (BLOCK_K divides bk) scales its
  partial product by its token scales and its weight block's scales.
Accumulation is fp32 throughout. GPUs without FP8 tensor cores take the W8A16 kernel instead
(`kernels.dispatch.fp8_linear` picks by capability).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import cdiv, check_fp8_weight, check_same_device
from .reference import fp8_quantize_static_ref, fp8_quantize_tokens_ref


@triton.jit
def _fp8_w8a8_kernel(
    # pointers
    out_ptr,
    a_ptr,
    w_ptr,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    # sizes
    M,
    N,
    K,
    scale_bn,
    scale_bk,
    # strides (the K axis of a and w, the N axis of out are contiguous)
    stride_om,
    stride_am,
    stride_wn,
    stride_asm,
    stride_wsn,
    # meta
    HAS_BIAS: tl.constexpr,
    SCALE_AT_END: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_scale_rows = a_scale_ptr + offs_m.to(tl.int64) * stride_asm
    w_scale_rows = w_scale_ptr + (offs_n // scale_bn).to(tl.int64) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        a = tl.load(
            a_ptr + offs_m[:, None].to(tl.int64) * stride_am + k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        # [BLOCK_K, BLOCK_N] view of W.T
        w = tl.load(
            w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + k[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        part = tl.dot(a, w, out_dtype=tl.float32)
        if SCALE_AT_END:
            acc += part
        else:
            sa = tl.load(a_scale_rows + k0 // scale_bk, mask=mask_m, other=0.0)
            sw = tl.load(w_scale_rows + k0 // scale_bk, mask=mask_n, other=0.0)
            acc += part * sa[:, None] * sw[None, :]
    if SCALE_AT_END:
        sa = tl.load(a_scale_rows, mask=mask_m, other=0.0)
        sw = tl.load(w_scale_rows, mask=mask_n, other=0.0)
        acc = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def block_k_for(block: tuple[int, int], k: int) -> int | None:
    """The K tile for a weight scale block (bn, bk), or None when the W8A8 kernel cannot take
    it (block-scaled with bk not a multiple of 32: the FP8 dot needs K tiles of 32 or more)."""
    if block[1] >= k:
        return 128 if k >= 128 else 64 if k >= 64 else 32
    for tile in (128, 64, 32):
        if block[1] % tile == 0:
            return tile
    return None


def _block_mn(m: int) -> tuple[int, int]:
    if m <= 16:
        return 16, 64
    if m <= 64:
        return 64, 128
    return 128, 128


def fp8_w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    scale_ub: float | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequant(weight).T + bias with x quantized to FP8 per token (per token and bk-group
    when block-scaled; with the checkpoint's static per-tensor `input_scale` when given), both
    operands FP8 in the dot (Triton).

    Args:
        x: [..., K] fp32/fp16/bf16, last dim contiguous.
        weight: float8_e4m3fn [N, K], contiguous.
        scale: float32 [ceil(N / bn), ceil(K / bk)]: weight[n, k] * scale[n // bn, k // bk].
        block: (bn, bk); bk >= K (per-tensor / per-channel) or a multiple of 32.
        bias: [N] or None.
        scale_ub: cap on each token's absmax (fbgemm_fp8's activation_scale_ub), or None.
        input_scale: float32 scalar, the static activation scale (`fp8` / compressed-tensors
            checkpoints with activation_scheme static); needs a scale block spanning K.

    Returns:
        [..., N] in x.dtype.
    """
    n, k = check_fp8_weight(x, weight, scale, block)
    bn, bk = block
    block_k = block_k_for(block, k)
    if block_k is None:
        raise ValueError(
            f"W8A8 needs a weight block whose bk spans K or is a multiple of 32, got {tuple(block)}"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, scale=scale, bias=bias)
    per_token = bk >= k
    if input_scale is not None:
        if not per_token:
            raise ValueError(
                f"a static input scale needs a weight scale spanning K (per-tensor or per-channel), "
                f"got block {tuple(block)}"
            )
        if input_scale.numel() != 1:
            raise ValueError(f"input_scale must hold one value, got {tuple(input_scale.shape)}")
        check_same_device(x=x, input_scale=input_scale)
        x_q, x_scale = fp8_quantize_static_ref(x.reshape(-1, k), input_scale)
    else:
        x_q, x_scale = fp8_quantize_tokens_ref(x.reshape(-1, k), k if per_token else bk, scale_ub)
    weight = weight.contiguous()
    scale = scale.to(torch.float32).contiguous()
    m = x_q.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m, block_n = _block_mn(m)
        grid = (cdiv(m, block_m), cdiv(n, block_n))
        _fp8_w8a8_kernel[grid](
            out, x_q, weight, x_scale, scale, bias if bias is not None else out,
            m, n, k, bn, bk,
            out.stride(0), x_q.stride(0), weight.stride(0), x_scale.stride(0), scale.stride(0),
            HAS_BIAS=bias is not None,
            SCALE_AT_END=per_token,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
