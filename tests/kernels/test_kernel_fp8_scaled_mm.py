"""W8A8 FP8 scaled GEMM vs its torch reference (the same per-token activation quantization):
per-tensor, per-channel and block-scaled weights (ragged blocks at the N and K edges), M = 1
and ragged M, N not a multiple of the tile, the activation-scale cap; and the capability-based
choice between W8A8 and W8A16."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch
from splitserve.kernels.fp8_scaled_mm import block_k_for, fp8_w8a8_linear
from splitserve.kernels.reference import (
    fp8_linear_ref,
    fp8_quantize_static_ref,
    fp8_quantize_tokens_ref,
    fp8_w8a8_linear_ref,
)

from .kernel_test_utils import DEVICE, DTYPES, cdiv, requires_compiled_gpu

# (atol, rtol) against the reference on the same quantized operands: FP8 products are exact in
# fp32, so only the summation order (and where the scales multiply) differs; fp16 / bf16 round
# the output once.
GEMM_TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 2e-2),
}

# (M, N, K)
SHAPES = [(1, 64, 128), (1, 70, 256), (5, 100, 96), (33, 130, 256), (70, 40, 320)]


def _layouts(n: int, k: int) -> dict[str, tuple[int, int]]:
    return {
        "tensor": (n, k),
        "channel": (1, k),
        "block128": (128, 128),  # the DeepSeek-V3 / Qwen3-FP8 block; ragged at these sizes
        "block16x32": (16, 32),
    }


def _case(m: int, n: int, k: int, block: tuple[int, int], dtype: torch.dtype):
    weight = (torch.randn(n, k, device=DEVICE) * 2).to(torch.float8_e4m3fn)
    scale = torch.rand(cdiv(n, block[0]), cdiv(k, block[1]), device=DEVICE) * 0.02 + 0.005
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    return x, weight, scale, bias


def _check(out, x, weight, scale, block, bias, scale_ub=None):
    expected = fp8_w8a8_linear_ref(
        x.float(), weight, scale, block, None if bias is None else bias.float(), scale_ub
    )
    atol, rtol = GEMM_TOL[x.dtype]
    assert out.dtype == x.dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["tensor", "channel", "block128", "block16x32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp8_w8a8_matches_reference(shape, layout, dtype):
    m, n, k = shape
    block = _layouts(n, k)[layout]
    x, weight, scale, bias = _case(m, n, k, block, dtype)
    _check(fp8_w8a8_linear(x, weight, scale, block, bias), x, weight, scale, block, bias)
    _check(fp8_w8a8_linear(x, weight, scale, block), x, weight, scale, block, None)


def test_activation_scale_cap():
    """fbgemm_fp8's activation_scale_ub caps each token's absmax: outliers saturate at 448."""
    x, weight, scale, _ = _case(4, 48, 64, (1, 64), torch.float32)
    x[1, 5] = 300.0
    capped = fp8_w8a8_linear(x, weight, scale, (1, 64), scale_ub=2.0)
    _check(capped, x, weight, scale, (1, 64), None, scale_ub=2.0)
    free = fp8_w8a8_linear(x, weight, scale, (1, 64))
    assert not torch.allclose(capped[1], free[1], atol=1e-2)


def test_token_quantization_reference():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q, s = fp8_quantize_tokens_ref(x, 2)
    assert s.shape == (2, 3)
    torch.testing.assert_close(s[0], torch.tensor([2.0, 4.0, 3.0]) / 448)
    assert q[0, 1].float() == -448 and q[0, 3].float() == 448
    assert torch.equal(q[1].float(), torch.zeros(5))


def test_fp8_w8a8_checks_its_arguments():
    x, weight, scale, _ = _case(2, 48, 64, (16, 32), torch.float32)
    with pytest.raises(ValueError, match=r"scale must be \[3, 2\] .* got \(2, 2\)"):
        fp8_w8a8_linear(x, weight, scale[:2], (16, 32))
    with pytest.raises(ValueError, match=r"bk spans K or is a multiple of 32, got \(16, 24\)"):
        fp8_w8a8_linear(x, weight, torch.ones(3, 3, device=DEVICE), (16, 24))


def test_kernel_choice_by_capability():
    assert block_k_for((128, 128), 4096) == 128 and block_k_for((1, 4096), 4096) == 128
    assert block_k_for((16, 24), 64) is None
    assert dispatch.fp8_kernel_for((9, 0), (128, 128), 4096) == "w8a8"
    assert dispatch.fp8_kernel_for((8, 9), (1, 4096), 4096) == "w8a8"
    assert dispatch.fp8_kernel_for((8, 0), (128, 128), 4096) == "w8a16"  # Ampere
    assert dispatch.fp8_kernel_for((9, 0), (16, 24), 64) == "w8a16"  # a block W8A8 cannot take
    assert dispatch.fp8_kernel_for(None, (128, 128), 4096) == "w8a16"  # not CUDA
    x = torch.randn(2, 64)
    assert dispatch.fp8_gemm_kind(x, (1, 64)) == "torch"
    assert dispatch.fp8_gemm_kind(x, (1, 64), backend="triton") == "w8a16"


def test_dispatch_runs_the_kernel_it_picks():
    x, weight, scale, bias = _case(3, 40, 128, (1, 128), torch.float32)
    out = dispatch.fp8_linear(x, weight, scale, (1, 128), bias, backend="triton")
    if dispatch.fp8_gemm_kind(x, (1, 128), backend="triton") == "w8a8":
        _check(out, x, weight, scale, (1, 128), bias)
    else:
        expected = fp8_linear_ref(x, weight, scale, (1, 128), bias)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@requires_compiled_gpu
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (256, 4096, 4096), (1000, 14336, 4096)])
@pytest.mark.parametrize("block", [(1, 4096), (128, 128)], ids=str)
def test_fp8_w8a8_bf16_on_gpu(shape, block):
    if torch.cuda.get_device_capability() < dispatch.W8A8_MIN_CAPABILITY:
        pytest.skip("no FP8 tensor cores")
    m, n, k = shape
    x, weight, scale, bias = _case(m, n, k, block, torch.bfloat16)
    _check(fp8_w8a8_linear(x, weight, scale, block, bias), x, weight, scale, block, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["tensor", "channel"])
def test_static_input_scale(layout, dtype):
    """A checkpoint's static per-tensor activation scale replaces the per-token one: values
    past its calibrated range saturate at 448, where the dynamic path would not."""
    m, n, k = 6, 70, 96
    block = _layouts(n, k)[layout]
    x, weight, scale, bias = _case(m, n, k, block, dtype)
    x[2, 3] = 40.0  # beyond 448 * 0.05
    input_scale = torch.tensor(0.05, device=DEVICE)
    out = fp8_w8a8_linear(x, weight, scale, block, bias, input_scale=input_scale)
    expected = fp8_w8a8_linear_ref(
        x.float(), weight, scale, block, bias.float(), input_scale=input_scale
    )
    atol, rtol = GEMM_TOL[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    dynamic = fp8_w8a8_linear(x, weight, scale, block, bias)
    assert not torch.allclose(out[2].float(), dynamic[2].float(), atol=1e-1)
    torch.testing.assert_close(out[0].float(), dynamic[0].float(), atol=0.5, rtol=0.1)


def test_static_quantization_reference():
    x = torch.tensor([[1.0, -2.0, 500.0], [0.0, 0.25, -1000.0]])
    q, s = fp8_quantize_static_ref(x, torch.tensor([0.5]))
    assert s.shape == (2, 1) and torch.equal(s, torch.full((2, 1), 0.5))
    assert q[0, 0].float() == 2.0 and q[0, 1].float() == -4.0 and q[1, 1].float() == 0.5
    assert q[0, 2].float() == 448.0 and q[1, 2].float() == -448.0


def test_static_input_scale_needs_a_scale_spanning_k():
    x, weight, scale, _ = _case(2, 48, 64, (16, 32), torch.float32)
    with pytest.raises(ValueError, match=r"static input scale needs a weight scale spanning K"):
        fp8_w8a8_linear(x, weight, scale, (16, 32), input_scale=torch.tensor(0.1))


def test_dispatch_passes_the_activation_scheme(monkeypatch):
    """fp8_linear hands the static scale to the W8A8 GEMM it picks, and a weight-only
    checkpoint takes W8A16 even where W8A8 would run."""
    x, weight, scale, bias = _case(3, 40, 128, (1, 128), torch.float32)
    monkeypatch.setattr(dispatch, "fp8_gemm_kind", lambda *args: "w8a8")
    input_scale = torch.tensor(0.01, device=DEVICE)
    out = dispatch.fp8_linear(x, weight, scale, (1, 128), bias, input_scale=input_scale)
    expected = fp8_w8a8_linear_ref(x, weight, scale, (1, 128), bias, input_scale=input_scale)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    weight_only = dispatch.fp8_linear(x, weight, scale, (1, 128), bias, weight_only=True)
    torch.testing.assert_close(
        weight_only, fp8_linear_ref(x, weight, scale, (1, 128), bias), atol=1e-4, rtol=1e-4
    )


@requires_compiled_gpu
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (256, 4096, 4096)])
def test_fp8_w8a8_static_bf16_on_gpu(shape):
    if torch.cuda.get_device_capability() < dispatch.W8A8_MIN_CAPABILITY:
        pytest.skip("no FP8 tensor cores")
    m, n, k = shape
    x, weight, scale, bias = _case(m, n, k, (n, k), torch.bfloat16)
    input_scale = torch.tensor(0.01, device=DEVICE)
    out = fp8_w8a8_linear(x, weight, scale, (n, k), bias, input_scale=input_scale)
    expected = fp8_w8a8_linear_ref(
        x.float(), weight, scale, (n, k), bias.float(), input_scale=input_scale
    )
    torch.testing.assert_close(out.float(), expected, atol=1e-1, rtol=2e-2)
