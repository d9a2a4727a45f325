"""CPU (torch) paths of the elementwise ops: RMSNorm, fused residual add, rotary, SiLU-and-mul.

Unlike the references (fp32 everywhere, for clarity), these take the cheapest route to the same
numbers: fp32 models use fused torch kernels or in-place arithmetic with no dtype round trips,
and the arithmetic follows what transformers computes in the model dtype (norm statistics in
fp32, the weight applied after the cast back; SiLU and the product in the model dtype).
`tests/kernels` holds them to the references with the named tolerances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., N] by weight [N]: statistics in fp32, cast back, then scaled."""
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32:
        # One fused kernel; the same arithmetic as the spelled-out path below.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return (weight * (xf * torch.rsqrt(variance + eps)).to(dtype)).to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the add happens in the model dtype.

    NOTE: x is consumed: the sum is written into it and returned as the new residual (x is a
    layer's fresh output; a new tensor per call costs page faults on large prefills).
    `residual` is left untouched.
    """
    x += residual
    return rms_norm(x, weight, eps), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I], in x's dtype; x is not modified."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def clamped_swiglu(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gated activation over x [..., 2I] = [gate | up], in x's dtype:
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit)."""
    gate, up = x.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up.clamp(-limit, limit) + 1) * glu


def moe_activation(
    x: torch.Tensor, swiglu_limit: float | None, swiglu_alpha: float
) -> torch.Tensor:
    """The experts' gated activation: SiLU-and-mul, or the clamped SwiGLU when a limit is set."""
    if swiglu_limit is None:
        return silu_and_mul(x)
    return clamped_swiglu(x, swiglu_alpha, swiglu_limit)


def _joint_view(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q and k as ONE [T, Hq + Hk, D] view when k's heads directly follow q's in memory (the
    fused qkv projection's layout), so both rotate in one pass; else None."""
    if (
        q.dtype != k.dtype
        or q.shape[0] != k.shape[0]
        or q.shape[2] != k.shape[2]
        or q.stride() != k.stride()
        or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
        or k.storage_offset() != q.storage_offset() + q.shape[1] * q.stride(1)
    ):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> None:
    """Rotate the leading 2 * cos.shape[-1] dims of x [T, H, D] in place; cos/sin [T, 1, R/2]."""
    half = cos.shape[-1]
    if is_neox:
        x1, x2 = x[..., :half], x[..., half : 2 * half]
    else:
        x1, x2 = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
    # NOTE: the products are rounded before the sum, as transformers' x*cos + rotate_half(x)*sin.
    t = x1 * sin
    x1.mul_(cos).sub_(x2 * sin)
    x2.mul_(cos).add_(t)


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by positions [T]; returns (q, k).

    cos_sin_cache: [max_pos, R] (cos half, sin half); only the first R dims of a head rotate.
    fp32 tensors rotate in place directly; other dtypes go through fp32 and are rounded once.
    """
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    rows = cos_sin_cache.index_select(0, positions).to(torch.float32)
    cos, sin = rows[:, None, :half], rows[:, None, half:]
    joint = _joint_view(q, k)
    for x in (joint,) if joint is not None else (q, k):
        if x.dtype == torch.float32:
            _rotate_(x, cos, sin, is_neox)
        else:
            xf = x[..., :rot].float()
            _rotate_(xf, cos, sin, is_neox)
            x[..., :rot] = xf
    return q, k


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: torch.Tensor | None = None
) -> None:
    """The reference's grammar mask on CPU, about 3x faster: numpy unpacks the words' bits
    (little-endian words, as x86 and ARM store them) into one boolean mask per row."""
    import sys

    import numpy as np

    from .reference import apply_token_bitmask_ref

    if logits.device.type != "cpu" or sys.byteorder != "little":
        apply_token_bitmask_ref(logits, bitmask, indices)
        return
    n = min(logits.shape[1], bitmask.shape[1] * 32)
    words = bitmask.contiguous().numpy()
    if indices is not None:
        rows = indices.to(torch.int64)
        words = words[rows.numpy()]
    blocked = torch.from_numpy(
        np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :n] == 0
    )
    if indices is None:
        logits[:, :n].masked_fill_(blocked, float("-inf"))
    else:
        logits[rows, :n] = logits[rows, :n].masked_fill(blocked, float("-inf"))
