"""The fused MoE Triton kernel (interpreted on CPU) against the token-by-token reference."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch, reference
from splitserve.kernels.fused_moe import fused_moe, moe_align

from .kernel_test_utils import DEVICE, DTYPES, MOE_TOL, assert_close, requires_compiled_gpu

# (tokens, experts, top_k, hidden, intermediate): odd sizes, tiles cut in N and K.
SHAPES = [(1, 4, 1, 8, 6), (7, 5, 2, 24, 10), (33, 8, 2, 40, 36), (50, 6, 3, 17, 9)]


def _case(num_tokens, num_experts, top_k, hidden, inter, dtype, skip=()):
    x = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=DEVICE) * 0.3).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=DEVICE) * 0.3).to(dtype)
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip], device=DEVICE)
    ids = allowed[torch.rand(num_tokens, len(allowed), device=DEVICE).topk(top_k, -1).indices]
    weights = torch.rand(num_tokens, top_k, device=DEVICE)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype):
    args = _case(*shape, dtype)
    out = fused_moe(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out, reference.fused_moe_ref(*args), MOE_TOL)


def test_an_expert_without_tokens_gets_no_block():
    x, w13, w2, weights, ids = _case(19, 6, 2, 16, 12, torch.float32, skip={2})
    expected = reference.fused_moe_ref(x, w13, w2, weights, ids)
    w13[2] = float("nan")
    w2[2] = float("nan")
    _, block_expert = moe_align(ids, 6)
    assert 2 not in block_expert.tolist()
    out = fused_moe(x, w13, w2, weights, ids)
    assert torch.isfinite(out).all()
    assert_close(out, expected, MOE_TOL)


def test_align_groups_pairs_by_expert_in_padded_blocks():
    ids = torch.tensor([[1, 3], [3, 0], [1, 0], [3, 1]], device=DEVICE)
    pair_ids, block_expert = moe_align(ids, 5, block_m=4)
    blocks = pair_ids.view(-1, 4).tolist()
    # Expert 0 has pairs 3 and 5, expert 1 pairs 0, 4, 7, expert 3 pairs 1, 2, 6; 8 pads.
    assert blocks[:3] == [[3, 5, 8, 8], [0, 4, 7, 8], [1, 2, 6, 8]]
    assert block_expert.tolist()[:3] == [0, 1, 3]
    # The grid is sized for any routing; the spare blocks name no expert.
    assert len(blocks) == (8 + 5 * 3 + 3) // 4 and set(block_expert.tolist()[3:]) == {5}


def test_no_tokens_and_shape_checks():
    x, w13, w2, weights, ids = _case(3, 4, 2, 8, 6, torch.float32)
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 8)
    with pytest.raises(ValueError, match="do not fit x"):
        fused_moe(x, w13, w2[:, :4], weights, ids)
    with pytest.raises(ValueError, match="must both be"):
        fused_moe(x, w13, w2, weights[:, :1], ids)


def test_dispatch_routes_by_backend():
    args = _case(9, 4, 2, 16, 8, torch.float32)
    expected = reference.fused_moe_ref(*args)
    for backend in ("torch", "triton"):
        assert_close(dispatch.fused_moe(*args, backend=backend), expected, MOE_TOL)


@requires_compiled_gpu
@pytest.mark.gpu
def test_bf16_on_gpu():
    args = _case(300, 8, 2, 512, 256, torch.bfloat16)
    assert_close(fused_moe(*args), reference.fused_moe_ref(*args), MOE_TOL)


def _biased(num_experts, hidden, inter, dtype):
    b13 = (torch.randn(num_experts, 2 * inter, device=DEVICE) * 2).to(dtype)
    b2 = torch.randn(num_experts, hidden, device=DEVICE).to(dtype)
    return b13, b2


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=str)
def test_biases_and_clamped_swiglu_match_reference(shape):
    """gpt-oss experts: biases on both projections, the clamped SwiGLU (large biases push the
    gate and up past the limit, so the clamps decide the result)."""
    args = _case(*shape, torch.float32)
    b13, b2 = _biased(shape[1], shape[3], shape[4], torch.float32)
    extra = dict(b13=b13, b2=b2, swiglu_limit=1.0, swiglu_alpha=1.702)
    expected = reference.fused_moe_ref(*args, **extra)
    assert_close(fused_moe(*args, **extra), expected, MOE_TOL)
    assert_close(dispatch.fused_moe(*args, **extra, backend="torch"), expected, MOE_TOL)
    plain = reference.fused_moe_ref(*args)
    assert not torch.allclose(plain, expected, atol=1e-2)  # the options change the function
    unclamped = reference.fused_moe_ref(*args, b13=b13, b2=b2, swiglu_limit=1e9)
    assert not torch.allclose(unclamped, expected, atol=1e-2)
