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
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual); the add happens in the model dtype."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(x[..., :I]) * x[..., I:] for x [..., 2I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotation of q [T, Hq * D] and k [T, Hk * D] by cos/sin [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    num_tokens = q.shape[0]
    q = q.view(num_tokens, -1, head_dim)
    k = k.view(num_tokens, -1, head_dim)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q.view(num_tokens, -1), k.view(num_tokens, -1)


class RMSNorm(nn.Module):
    """RMSNorm; called with a residual it adds first and returns (normed, new residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    """The gated activation of Llama-style MLPs over a fused gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
