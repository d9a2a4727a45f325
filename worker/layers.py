"""Layer math of the decoder: RMSNorm (with fused residual add), SiLU-and-mul, rotary apply.

These are the seams where `splitserve.kernels` (Triton on GPU) gets dispatched; the bodies here
are the plain-torch path and compute exactly what transformers computes (fp32 norm statistics,
weight applied after the cast back), so CPU parity tests compare like with like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., H]: statistics in fp32, result cast back, then scaled by weight."""
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32:
        # One fused kernel; the same arithmetic as the spelled-out path below.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual); the add happens in the model dtype.

    NOTE: x is consumed: the sum is written into it (a layer's fresh output), which saves an
    allocation per call; `residual` is left untouched.
    """
    x += residual
    return rms_norm(x, weight, eps), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(x[..., :I]) * x[..., I:] for x [..., 2I]; computed in place in x's first half.

    Returns a strided view of x (row stride 2I), which matmuls read without a copy.
    """
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation of x [T, H, D] (queries and keys of any heads) by cos/sin [T, D].

    Same arithmetic as transformers' `x * cos + rotate_half(x) * sin` (cos/sin halves are
    equal), written half by half into one output to avoid four temporaries.
    """
    half = x.shape[-1] // 2
    cos, sin = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1)
    out1.sub_(x2 * sin)
    torch.mul(x2, cos, out=out2)
    out2.add_(x1 * sin)
    return out


class RMSNorm(nn.Module):
    """RMSNorm; called with a residual it adds first and returns (normed, new residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    """The gated activation of Llama-style MLPs over a fused gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
