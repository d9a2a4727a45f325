"""Gated activations of an MLP: act(x[:, :I]) * x[:, I:] for SiLU and GELU (erf or tanh).

The input is the fused gate_up projection output [T, 2I]; the kernel reads both halves of a
column block and writes [T, I], so the gate and up halves never round-trip through memory
separately. Math in fp32, one rounding at the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, next_power_of_2

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}


@triton.jit
def _act_and_mul_kernel(
    # pointers
    out_ptr,
    x_ptr,
    # sizes
    inter,
    # strides (rows; the feature axis is contiguous)
    stride_out,
    stride_x,
    # meta
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:  # silu
        act = gate * tl.sigmoid(gate)
    elif ACT == 1:  # gelu, exact erf form
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:  # gelu, tanh form: 0.5 * g * (1 + tanh(z)) == g * sigmoid(2z); tl has no tanh
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate * tl.sigmoid(2.0 * z)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def act_and_mul(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(x[..., :I]) * x[..., I:] (Triton).

    Args:
        x: [..., 2I] fp32/fp16/bf16, last dim contiguous.
        activation: "silu", "gelu" (erf) or "gelu_tanh".

    Returns:
        [..., I] in x.dtype.
    """
    if activation not in _ACT_ID:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_float("x", x, x.dim())
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"last dim of x must be even, got shape {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] and inter:
        block = min(1024, next_power_of_2(inter))
        grid = (x2.shape[0], triton.cdiv(inter, block))
        _act_and_mul_kernel[grid](
            out, x2, inter, out.stride(0), x2.stride(0),
            ACT=_ACT_ID[activation], BLOCK=block, num_warps=4,
        )  # fmt: skip
    return out.view(*x.shape[:-1], inter)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] (Triton). x: [..., 2I] -> [..., I]."""
    return act_and_mul(x, "silu")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(x[..., :I]) * x[..., I:] (Triton); approximate "none" (erf) or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return act_and_mul(x, "gelu" if approximate == "none" else "gelu_tanh")
