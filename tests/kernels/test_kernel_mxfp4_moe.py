"""The MXFP4 fused-MoE Triton kernel (interpreted on CPU) against its torch reference
(`torch_mxfp4`: dequantize, then the fused MoE)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch
from splitserve.kernels.fused_moe import moe_align
from splitserve.kernels.mxfp4_moe import fused_moe_mxfp4, mxfp4_grouped_gemm
from splitserve.kernels.torch_mxfp4 import dequantize_mxfp4, fused_moe_mxfp4_torch

from .kernel_test_utils import DEVICE, MOE_TOL, requires_compiled_gpu


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    """The MoE tolerance of expected's dtype, atol relative to the output's magnitude (the
    random FP4 weights give outputs of tens; the GEMMs sum in another order)."""
    atol, rtol = tol[expected.dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


def _packed(experts, n, k, gen, scale_range=(116, 123)):
    blocks = torch.randint(0, 256, (experts, n, k // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(*scale_range, (experts, n, k // 32), generator=gen, dtype=torch.uint8)
    return blocks.to(DEVICE), scales.to(DEVICE)


def _gemm(a, blocks, scales, ids):
    """One routed slot per row: out[t] = a[t] @ dequant(expert ids[t]).T through the kernel."""
    pair_ids, block_expert = moe_align(ids[:, None], blocks.shape[0])
    out = torch.empty(a.shape[0], blocks.shape[1], dtype=a.dtype, device=a.device)
    weights = torch.ones(a.shape[0], device=a.device)
    mxfp4_grouped_gemm(out, a, blocks, scales, pair_ids, block_expert, weights, 1, True, False)
    return out


def test_every_nibble_decodes_in_the_load_stage():
    """All 256 byte values (every low and high nibble pair) in one expert's rows, and one-hot
    activations that read each decoded value out on its own."""
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 4, 4, 16)  # N 4, K 128
    scales = torch.full((1, 4, 4), 127, dtype=torch.uint8)
    eye = torch.eye(128)
    out = _gemm(
        eye.to(DEVICE), blocks.to(DEVICE), scales.to(DEVICE), torch.zeros(128, dtype=torch.long)
    )
    assert torch.equal(out.cpu().T, dequantize_mxfp4(blocks, scales)[0])


@pytest.mark.parametrize("scale", [0, 1, 64, 126, 127, 128, 200, 235])
def test_e8m0_scales_including_the_extremes(scale):
    """Every code under one scale, 2^-127 (subnormal) up to 2^108, read out exactly."""
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 4, 4, 16)
    scales = torch.full((1, 4, 4), scale, dtype=torch.uint8)
    out = _gemm(
        torch.eye(128).to(DEVICE),
        blocks.to(DEVICE),
        scales.to(DEVICE),
        torch.zeros(128, dtype=torch.long),
    )
    assert torch.equal(out.cpu().T, dequantize_mxfp4(blocks, scales)[0])


def test_group_boundaries_each_take_their_own_scale():
    """K = 96: three scale groups, the last one a partial K step; every group of every row a
    different scale."""
    gen = torch.Generator().manual_seed(3)
    blocks, scales = _packed(2, 40, 96, gen, (100, 140))
    a = torch.randn(7, 96, generator=gen).to(DEVICE)
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    out = _gemm(a, blocks, scales, ids)
    dense = dequantize_mxfp4(blocks.cpu(), scales.cpu()).double()
    expected = torch.stack([dense[e] @ a[t].cpu().double() for t, e in enumerate(ids.tolist())])
    torch.testing.assert_close(
        out.cpu().double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()
    )


# (tokens, experts, top_k, hidden, intermediate): one token, ragged runs, N cut by BLOCK_N.
SHAPES = [(1, 4, 1, 32, 32), (1, 4, 2, 64, 96), (9, 5, 2, 96, 32), (37, 8, 3, 64, 64)]


def _case(num_tokens, num_experts, top_k, hidden, inter, skip=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE)
    w13 = _packed(num_experts, 2 * inter, hidden, gen)
    w2 = _packed(num_experts, hidden, inter, gen)
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip])
    ids = allowed[torch.rand(num_tokens, len(allowed), generator=gen).topk(top_k, -1).indices]
    weights = torch.rand(num_tokens, top_k, generator=gen)
    extra = dict(
        b13=torch.randn(num_experts, 2 * inter, generator=gen).to(DEVICE),
        b2=torch.randn(num_experts, hidden, generator=gen).to(DEVICE),
        swiglu_limit=3.0,
    )
    return (x, *w13, *w2, weights.to(DEVICE), ids.to(DEVICE)), extra


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape):
    args, extra = _case(*shape)
    out = fused_moe_mxfp4(*args, **extra)
    expected = fused_moe_mxfp4_torch(*args, **extra)
    assert out.shape == args[0].shape
    assert_close(out, expected, MOE_TOL)
    assert_close(dispatch.fused_moe_mxfp4(*args, **extra, backend="triton"), expected, MOE_TOL)


def test_ragged_routing_with_an_idle_expert():
    """Expert 2 gets no token: its blocks decode to NaN (scale 255), which any block computed
    for it would spread into the output."""
    args, extra = _case(23, 6, 2, 64, 32, skip={2}, seed=5)
    expected = fused_moe_mxfp4_torch(*args, **extra)
    args[2][2] = 255
    args[4][2] = 255
    counts = torch.bincount(args[-1].flatten(), minlength=6)
    assert counts[2] == 0 and len(set(counts.tolist())) > 2  # idle expert, uneven runs
    out = fused_moe_mxfp4(*args, **extra)
    assert torch.isfinite(out).all()
    assert_close(out, expected, MOE_TOL)


def test_silu_path_and_no_tokens():
    args, extra = _case(5, 4, 2, 32, 32, seed=7)
    assert_close(fused_moe_mxfp4(*args), fused_moe_mxfp4_torch(*args), MOE_TOL)
    empty = (args[0][:0], *args[1:5], args[5][:0], args[6][:0])
    assert fused_moe_mxfp4(*empty).shape == (0, 32)


def test_shape_checks():
    args, _ = _case(3, 4, 2, 64, 32)
    with pytest.raises(ValueError, match="MXFP4 scales"):
        fused_moe_mxfp4(args[0][:, :32].contiguous(), *args[1:])
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe_mxfp4(*args[:5], args[5][:, :1], args[6])


@requires_compiled_gpu
def test_bf16_on_gpu():
    args, extra = _case(33, 8, 2, 128, 64)
    args = (args[0].bfloat16(), *args[1:])
    extra = {k: (v.bfloat16() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
    assert_close(fused_moe_mxfp4(*args, **extra), fused_moe_mxfp4_torch(*args, **extra), MOE_TOL)
