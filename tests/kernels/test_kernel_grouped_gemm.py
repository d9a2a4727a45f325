"""The grouped GEMM (interpreted on CPU) against its torch reference, in the contiguous and the
masked layouts, float and block-scaled FP8: empty groups, one row, ragged counts, groups larger
than a row tile; and the MoE built on it against the token-by-token MoE reference."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import reference
from splitserve.kernels.grouped_gemm import grouped_gemm_contiguous, grouped_gemm_masked
from splitserve.kernels.grouped_moe import contiguous_layout, grouped_moe, masked_layout
from splitserve.kernels.torch_grouped_gemm import (
    fused_moe_fp8_ref,
    grouped_gemm_contiguous_ref,
    grouped_gemm_masked_ref,
)

from .kernel_test_utils import DEVICE, DTYPES, MOE_TOL, assert_close, cdiv

# (atol, rtol) of one GEMM against the fp32 reference, output rounded once.
GEMM_TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-1, 2e-2),
}
# Per-group row counts: an empty group, one row, ragged, larger than a 16-row tile.
COUNTS = [[0, 1, 17, 5], [3], [40, 0, 0, 2, 16]]


def _contiguous_rows(counts: list[int], block_m: int) -> torch.Tensor:
    """m_indices for groups of `counts` rows, each run padded to block_m, one spare tile."""
    ids: list[int] = []
    for g, n in enumerate(counts):
        ids += [g] * n + [-1] * (cdiv(n, block_m) * block_m - n)
    ids += [-1] * block_m
    return torch.tensor(ids, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=str)
@pytest.mark.parametrize("block_m", [16, 32])
def test_contiguous_matches_reference(counts, block_m, dtype):
    m_indices = _contiguous_rows(counts, block_m)
    groups, n, k = len(counts), 70, 40
    a = torch.randn(m_indices.numel(), k, device=DEVICE).to(dtype)
    b = (torch.randn(groups, n, k, device=DEVICE) * 0.3).to(dtype)
    out = grouped_gemm_contiguous(a, b, m_indices, block_m=block_m)
    real = m_indices >= 0
    expected = grouped_gemm_contiguous_ref(a, b, m_indices)
    atol, rtol = GEMM_TOL[dtype]
    assert out.shape == (m_indices.numel(), n) and out.dtype == dtype
    torch.testing.assert_close(out[real].float(), expected[real].float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=str)
def test_masked_matches_reference(counts, dtype):
    groups, max_m, n, k = len(counts), max(max(counts), 1), 33, 72
    masked_m = torch.tensor(counts, dtype=torch.int32, device=DEVICE)
    a = torch.randn(groups, max_m, k, device=DEVICE).to(dtype)
    b = (torch.randn(groups, n, k, device=DEVICE) * 0.3).to(dtype)
    out = grouped_gemm_masked(a, b, masked_m)
    expected = grouped_gemm_masked_ref(a, b, masked_m)
    atol, rtol = GEMM_TOL[dtype]
    for g, count in enumerate(counts):
        torch.testing.assert_close(
            out[g, :count].float(), expected[g, :count].float(), atol=atol, rtol=rtol
        )


def _fp8_operands(rows: torch.Tensor, groups: int, n: int, block: tuple[int, int]):
    k = rows.shape[-1]
    a_q, a_s = reference.fp8_quantize_tokens_ref(rows.reshape(-1, k), block[1])
    b = (torch.randn(groups, n, k, device=DEVICE) * 2).to(torch.float8_e4m3fn)
    b_s = torch.rand(groups, cdiv(n, block[0]), cdiv(k, block[1]), device=DEVICE) * 0.02 + 0.005
    return a_q, a_s, b, b_s


@pytest.mark.parametrize("block", [(16, 32), (128, 128)], ids=str)
@pytest.mark.parametrize("counts", COUNTS[::2], ids=str)
def test_fp8_block_scaled_matches_dequantized_reference(counts, block):
    """FP8 products are exact in fp32: only the summation order differs from the reference
    on the dequantized operands."""
    k, n = 160, 96  # ragged last K group and N block for (128, 128)
    m_indices = _contiguous_rows(counts, 16)
    a_q, a_s, b, b_s = _fp8_operands(torch.randn(m_indices.numel(), k), len(counts), n, block)
    scales = dict(a_scale=a_s, b_scale=b_s, block=block, out_dtype=torch.float32)
    out = grouped_gemm_contiguous(a_q, b, m_indices, block_m=16, **scales)
    expected = grouped_gemm_contiguous_ref(a_q, b, m_indices, **scales)
    real = m_indices >= 0
    torch.testing.assert_close(out[real], expected[real], atol=1e-3, rtol=1e-4)

    groups, max_m = len(counts), max(counts)
    masked_m = torch.tensor(counts, dtype=torch.int32, device=DEVICE)
    a_q, a_s, b, b_s = _fp8_operands(torch.randn(groups, max_m, k), groups, n, block)
    a_q, a_s = a_q.view(groups, max_m, k), a_s.view(groups, max_m, -1)
    scales = dict(a_scale=a_s, b_scale=b_s, block=block, out_dtype=torch.float16)
    out = grouped_gemm_masked(a_q, b, masked_m, **scales)
    expected = grouped_gemm_masked_ref(a_q, b, masked_m, **scales)
    for g, count in enumerate(counts):
        torch.testing.assert_close(out[g, :count], expected[g, :count], atol=2e-2, rtol=1e-2)


def test_shape_and_dtype_checks():
    a, b = torch.randn(16, 8), torch.randn(2, 4, 8)
    ids = torch.zeros(16, dtype=torch.int32)
    with pytest.raises(ValueError, match="a has 6 features, b 8"):
        grouped_gemm_contiguous(a[:, :6], b, ids)
    with pytest.raises(ValueError, match="share a dtype"):
        grouped_gemm_contiguous(a.half(), b, ids)
    with pytest.raises(ValueError, match="bk a multiple of 32"):
        a_q = a.to(torch.float8_e4m3fn)
        grouped_gemm_contiguous(
            a_q, b.to(torch.float8_e4m3fn), ids, a_scale=torch.ones(16, 1),
            b_scale=torch.ones(2, 1, 1), block=(4, 8), out_dtype=torch.float32,
        )  # fmt: skip
    with pytest.raises(ValueError, match="masked_m"):
        grouped_gemm_masked(a.view(2, 8, 8), b, torch.zeros(3, dtype=torch.int32))


def test_layouts_place_each_pair_once():
    ids = torch.tensor([[1, 3], [3, 0], [1, 0], [3, 1]], device=DEVICE)
    pair_ids, m_indices = contiguous_layout(ids, 5, block_m=16)
    real = m_indices >= 0
    assert sorted(pair_ids[real].tolist()) == list(range(8))
    assert (m_indices[real] == ids.flatten()[pair_ids[real].long()]).all()
    assert m_indices.numel() % 16 == 0 and set(m_indices.view(-1, 16)[:, 0].tolist()) <= {
        0,
        1,
        3,
        -1,
    }
    slot, masked_m = masked_layout(ids, 5)
    assert masked_m.tolist() == [2, 3, 0, 3, 0]
    assert len(set(slot.tolist())) == 8
    assert ((slot // 4) == ids.flatten()).all() and ((slot % 4) < masked_m[slot // 4]).all()


# (tokens, experts, top_k, hidden, intermediate)
MOE_SHAPES = [(1, 4, 1, 8, 6), (7, 5, 2, 24, 10), (33, 8, 2, 40, 36)]


def _moe_case(num_tokens, num_experts, top_k, hidden, inter, dtype, skip=()):
    x = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=DEVICE) * 0.3).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=DEVICE) * 0.3).to(dtype)
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip], device=DEVICE)
    ids = allowed[torch.rand(num_tokens, len(allowed), device=DEVICE).topk(top_k, -1).indices]
    return x, w13, w2, torch.rand(num_tokens, top_k, device=DEVICE), ids


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MOE_SHAPES, ids=str)
def test_grouped_moe_matches_reference(shape, dtype, layout):
    args = _moe_case(*shape, dtype, skip={1} if shape[1] > 4 else ())
    out = grouped_moe(*args, layout=layout)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out, reference.fused_moe_ref(*args), MOE_TOL)


def test_grouped_moe_skips_experts_without_tokens():
    x, w13, w2, weights, ids = _moe_case(19, 6, 2, 16, 12, torch.float32, skip={2})
    expected = reference.fused_moe_ref(x, w13, w2, weights, ids)
    w13[2] = float("nan")
    w2[2] = float("nan")
    for layout in ("contiguous", "masked"):
        out = grouped_moe(x, w13, w2, weights, ids, layout=layout)
        assert torch.isfinite(out).all()
        assert_close(out, expected, MOE_TOL)
    assert grouped_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 16)


def _fp8_experts(num_experts, hidden, inter, block):
    def stack(n, k):
        w = (torch.randn(num_experts, n, k, device=DEVICE) * 2).to(torch.float8_e4m3fn)
        s = torch.rand(num_experts, cdiv(n, block[0]), cdiv(k, block[1]), device=DEVICE)
        return w, s * 0.01 + 0.002

    return (*stack(2 * inter, hidden), *stack(hidden, inter))


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("num_tokens", [1, 21])
def test_grouped_moe_fp8_matches_its_reference(num_tokens, layout):
    block = (16, 32)
    w13, s13, w2, s2 = _fp8_experts(4, 64, 32, block)
    x = torch.randn(num_tokens, 64, device=DEVICE)
    weights = torch.rand(num_tokens, 2, device=DEVICE)
    ids = torch.rand(num_tokens, 4, device=DEVICE).topk(2, -1).indices
    out = grouped_moe(
        x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, block=block, layout=layout
    )
    expected = fused_moe_fp8_ref(x, w13, s13, w2, s2, block, weights, ids)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)


def test_dispatch_runs_plain_experts_on_the_grouped_gemm(monkeypatch):
    """backend triton: SwiGLU experts go to the grouped GEMM; biases or the clamped SwiGLU
    (gpt-oss) stay on the fused kernel; the torch path is unchanged."""
    from splitserve.kernels import dispatch, fused_moe
    from splitserve.kernels import grouped_moe as grouped_module

    used = []
    for module, name in ((grouped_module, "grouped_moe"), (fused_moe, "fused_moe")):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k)
        )
    args = _moe_case(9, 4, 2, 16, 8, torch.float32)
    expected = reference.fused_moe_ref(*args)
    assert_close(dispatch.fused_moe(*args, backend="triton"), expected, MOE_TOL)
    assert used == ["grouped_moe"]
    b13 = torch.zeros(4, 16, device=DEVICE)
    assert_close(dispatch.fused_moe(*args, b13=b13, backend="triton"), expected, MOE_TOL)
    assert_close(dispatch.fused_moe(*args, backend="torch"), expected, MOE_TOL)
    assert used == ["grouped_moe", "fused_moe"]
