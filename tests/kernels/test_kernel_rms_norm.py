"""RMSNorm kernels vs reference, and the reference vs Hugging Face's LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from splitserve.kernels.reference import fused_add_rms_norm_ref, rms_norm_ref
from splitserve.kernels.rms_norm import fused_add_rms_norm, rms_norm

from .kernel_test_utils import DEVICE, DTYPES, TOL, assert_close, requires_compiled_gpu

SHAPES = [(1, 1), (3, 7), (5, 100), (2, 3, 257), (4, 1536)]


def _inputs(shape, dtype):
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    residual = torch.randn(shape, device=DEVICE).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_kernel(shape, dtype):
    x, _, weight = _inputs(shape, dtype)
    out = rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, rms_norm_ref(x, weight, 1e-6), TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_add_rms_norm_kernel(shape, dtype):
    x, residual, weight = _inputs(shape, dtype)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    normed_ref, residual_ref = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, residual_ref)  # a single rounded add: exact
    assert_close(normed, normed_ref, TOL)


def test_rms_norm_strided_rows():
    """Rows of a wider buffer (row stride != hidden) are read in place."""
    buf = torch.randn(6, 200, device=DEVICE)
    x = buf[:, :100]
    weight = torch.randn(100, device=DEVICE)
    assert_close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_matches_hf_llama(dtype):
    """The oracle follows HF: fp32 statistics, cast to dtype, then weight multiply."""
    hidden = 64
    hf = LlamaRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(hidden))
    hf = hf.to(dtype)
    x = (torch.randn(5, hidden) * 3).to(dtype)
    residual = torch.randn(5, hidden).to(dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm_ref(x, hf.weight, 1e-6), hf(x))
        normed, new_residual = fused_add_rms_norm_ref(x, residual, hf.weight, 1e-6)
        assert torch.equal(new_residual, x + residual)
        assert torch.equal(normed, hf(x + residual))


def test_rms_norm_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8, device=DEVICE), torch.randn(7, device=DEVICE), 1e-6)


@requires_compiled_gpu
@pytest.mark.gpu
def test_bf16_on_gpu():
    x, residual, weight = _inputs((7, 4096), torch.bfloat16)
    assert_close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), TOL)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    normed_ref, residual_ref = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, residual_ref)
    assert_close(normed, normed_ref, TOL)
