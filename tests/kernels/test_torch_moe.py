"""The grouped torch path of the fused MoE op against the token-by-token reference."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch, reference
from splitserve.kernels.torch_moe import fused_moe_torch

from .kernel_test_utils import MOE_TOL, assert_close


def _routing(num_tokens: int, num_experts: int, top_k: int, skip: set[int] = frozenset()):
    """Distinct random experts per token (never those in `skip`) and random weights."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip])
    scores = torch.rand(num_tokens, len(allowed))
    ids = allowed[scores.topk(top_k, dim=-1).indices]
    return torch.rand(num_tokens, top_k), ids


def _weights(num_experts: int, hidden: int, inter: int, dtype=torch.float32):
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype) * 0.3
    w2 = torch.randn(num_experts, hidden, inter, dtype=dtype) * 0.3
    return w13, w2


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,hidden,inter",
    [(1, 4, 1, 8, 6), (7, 5, 2, 24, 10), (33, 8, 2, 32, 24), (50, 6, 3, 17, 9)],
)
def test_grouped_path_matches_reference(num_tokens, num_experts, top_k, hidden, inter):
    x = torch.randn(num_tokens, hidden)
    w13, w2 = _weights(num_experts, hidden, inter)
    weights, ids = _routing(num_tokens, num_experts, top_k)
    out = dispatch.fused_moe(x, w13, w2, weights, ids)
    assert_close(out, reference.fused_moe_ref(x, w13, w2, weights, ids), MOE_TOL)


def test_an_expert_without_tokens_is_never_computed():
    """Expert 2 gets no token: its weights are NaN, and any compute on them (even times a
    zero weight) would poison the output."""
    x = torch.randn(19, 16)
    w13, w2 = _weights(6, 16, 12)
    weights, ids = _routing(19, 6, 2, skip={2})
    expected = reference.fused_moe_ref(x, w13, w2, weights, ids)
    w13[2] = float("nan")
    w2[2] = float("nan")
    assert torch.bincount(ids.flatten(), minlength=6)[2] == 0
    out = fused_moe_torch(x, w13, w2, weights, ids)
    assert torch.isfinite(out).all()
    assert_close(out, expected, MOE_TOL)


def test_no_tokens_and_half_dtype():
    w13, w2 = _weights(4, 8, 6)
    empty = fused_moe_torch(torch.empty(0, 8), w13, w2, torch.empty(0, 2), torch.empty(0, 2).long())
    assert empty.shape == (0, 8)
    x = torch.randn(9, 8, dtype=torch.bfloat16)
    w13, w2 = _weights(4, 8, 6, torch.bfloat16)
    weights, ids = _routing(9, 4, 2)
    out = fused_moe_torch(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference.fused_moe_ref(x, w13, w2, weights, ids), MOE_TOL)
