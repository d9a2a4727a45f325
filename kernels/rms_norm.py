"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.

One program per row; the row is held in one tile (hidden sizes up to 64K). The numerics follow
Hugging Face Llama: x + residual is rounded to the input dtype (that rounded sum is the new
residual), the mean square is taken in fp32, the normalised row is cast back to the input dtype
and only then multiplied by the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_same_device, next_power_of_2

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    # pointers
    out_ptr,
    residual_out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    # sizes and scalars
    hidden,
    eps,
    # strides (rows; the hidden axis is contiguous)
    stride_out,
    stride_res_out,
    stride_x,
    stride_res,
    # meta
    BLOCK: tl.constexpr,
    FUSED_ADD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if FUSED_ADD:
        r = tl.load(residual_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the activation dtype first: that is the residual the next layer sees.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask
    )


def _as_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """View [..., N] as [R, N] (no copy when the leading dims are collapsible)."""
    check_float(name, t, t.dim())
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dim")
    return t.reshape(-1, t.shape[-1])


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_same_device(x=x, residual=residual, weight=weight)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} > {MAX_HIDDEN} is not supported")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {residual.dtype} {tuple(residual.shape)} != x {x.dtype} {tuple(x.shape)}"
        )
    x2 = _as_rows("x", x)
    out = torch.empty_like(x2)
    res2 = _as_rows("residual", residual) if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else out
    rows = x2.shape[0]
    if rows:
        block = next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            out, res_out, x2, res2, weight,
            hidden, float(eps),
            out.stride(0), res_out.stride(0), x2.stride(0), res2.stride(0),
            BLOCK=block,
            FUSED_ADD=residual is not None,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    new_residual = res_out.view(x.shape) if residual is not None else None
    return out.view(x.shape), new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (Triton).

    Args:
        x: [..., N] fp32/fp16/bf16, last dim contiguous; weight: [N].

    Returns:
        [..., N] in x.dtype.
    """
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass (Triton).

    Args:
        x, residual: [..., N] same dtype, last dim contiguous; weight: [N].

    Returns:
        (normed, new_residual), both [..., N] in x.dtype, freshly allocated.
    """
    out, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual
