"""Gated activation kernels vs reference (and the reference vs the textbook formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.kernels.activation import gelu_and_mul, silu_and_mul
from splitserve.kernels.reference import gelu_and_mul_ref, silu_and_mul_ref

from .kernel_test_utils import DEVICE, DTYPES, TOL, assert_close, requires_compiled_gpu

SHAPES = [(1, 2), (3, 14), (5, 200), (2, 2 * 1031), (2, 3, 22)]
# sigmoid(-z) of a large z overflows exp() in the interpreter's numpy; the result (0) is right.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

KINDS = {
    "silu": (silu_and_mul, silu_and_mul_ref),
    "gelu": (gelu_and_mul, gelu_and_mul_ref),
    "gelu_tanh": (lambda x: gelu_and_mul(x, "tanh"), lambda x: gelu_and_mul_ref(x, "tanh")),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
def test_act_and_mul_kernel(kind, shape, dtype):
    kernel, reference = KINDS[kind]
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    out = kernel(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close(out, reference(x), TOL)


def test_references_follow_formulas():
    x = torch.randn(4, 10, dtype=torch.float64)
    g, u = x[:, :5], x[:, 5:]
    silu = g / (1 + torch.exp(-g)) * u
    gelu = 0.5 * g * (1 + torch.erf(g / math.sqrt(2))) * u
    gelu_tanh = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u
    # float64 formulas evaluated in a different order differ in the last bits.
    tol = dict(rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(silu_and_mul_ref(x), silu, **tol)
    torch.testing.assert_close(gelu_and_mul_ref(x), gelu, **tol)
    torch.testing.assert_close(gelu_and_mul_ref(x, "tanh"), gelu_tanh, **tol)
    assert (gelu - gelu_tanh).abs().max() > 1e-6  # the two GELU variants are distinguishable


def test_act_and_mul_rejects_odd_width():
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="approximate"):
        gelu_and_mul(torch.randn(2, 8, device=DEVICE), "fast")


@requires_compiled_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(KINDS))
def test_bf16_on_gpu(kind):
    kernel, reference = KINDS[kind]
    x = torch.randn(7, 2 * 4096, device=DEVICE, dtype=torch.bfloat16)
    assert_close(kernel(x), reference(x), TOL)
