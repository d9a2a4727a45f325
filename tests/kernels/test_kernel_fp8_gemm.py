"""W8A16 FP8 GEMM kernel vs its torch reference: per-tensor, per-channel and block scales
(ragged blocks at the N and K edges), M = 1 and ragged M, N not a multiple of the tile."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch
from splitserve.kernels.fp8_gemm import fp8_w8a16_linear
from splitserve.kernels.reference import fp8_dequantize_ref, fp8_linear_ref

from .kernel_test_utils import DEVICE, DTYPES, cdiv, requires_compiled_gpu

# (atol, rtol) against the fp32 reference on the same inputs: the kernel scales each K tile's
# partial product (the reference scales each weight) and sums in another order; fp16/bf16
# round the output once.
GEMM_TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 2e-2),
}

# (M, N, K)
SHAPES = [(1, 64, 128), (1, 70, 200), (5, 100, 96), (33, 130, 256), (70, 40, 72)]


def _layouts(n: int, k: int) -> dict[str, tuple[int, int]]:
    return {
        "tensor": (n, k),
        "channel": (1, k),
        "block128": (128, 128),  # the DeepSeek-V3 / Qwen3-FP8 block; ragged at these sizes
        "block16x24": (16, 24),  # K blocks not aligned to the K tile: per-element scales
        "block64x256": (64, 256),
    }


def _case(m: int, n: int, k: int, block: tuple[int, int], dtype: torch.dtype):
    weight = (torch.randn(n, k, device=DEVICE) * 2).to(torch.float8_e4m3fn)
    scale = torch.rand(cdiv(n, block[0]), cdiv(k, block[1]), device=DEVICE) * 0.02 + 0.005
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    return x, weight, scale, bias


def _check(out: torch.Tensor, x, weight, scale, block, bias):
    expected = fp8_linear_ref(
        x.float(), weight, scale, block, None if bias is None else bias.float()
    )
    atol, rtol = GEMM_TOL[x.dtype]
    assert out.dtype == x.dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["tensor", "channel", "block128", "block16x24", "block64x256"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp8_w8a16_matches_reference(shape, layout, dtype):
    m, n, k = shape
    block = _layouts(n, k)[layout]
    x, weight, scale, bias = _case(m, n, k, block, dtype)
    _check(fp8_w8a16_linear(x, weight, scale, block, bias), x, weight, scale, block, bias)
    _check(fp8_w8a16_linear(x, weight, scale, block), x, weight, scale, block, None)


@pytest.mark.parametrize("layout", ["tensor", "block16x24"])
def test_fp8_w8a16_decodes_weight_bytes_exactly(layout):
    """The path GPUs below sm_89 take (no e4m3 type in Triton): the weight's bytes decoded in
    the kernel. Every one of the 254 finite e4m3 values (subnormals, both signs) appears."""
    n, k = 64, 128
    finite = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = finite[(finite & 0x7F) != 0x7F]  # NaN bytes
    weight = finite.repeat(n * k // finite.numel() + 1)[: n * k].view(n, k)
    weight = weight.view(torch.float8_e4m3fn).to(DEVICE)
    block = _layouts(n, k)[layout]
    _, _, scale, bias = _case(3, n, k, block, torch.float32)
    x = torch.randn(3, k, device=DEVICE)
    _check(fp8_w8a16_linear(x, weight, scale, block, bias, weight_bits=True), x, weight, scale, block, bias)  # fmt: skip
    eye = torch.eye(k, device=DEVICE)  # the decoded weight itself, times its scale
    out = fp8_w8a16_linear(eye, weight, torch.ones_like(scale), block, weight_bits=True)
    assert torch.equal(out.T, weight.float())


def test_fp8_w8a16_batched_input_and_empty_rows():
    x, weight, scale, bias = _case(6, 48, 64, (16, 32), torch.float32)
    out = fp8_w8a16_linear(x.view(2, 3, 64), weight, scale, (16, 32), bias)
    assert out.shape == (2, 3, 48)
    _check(out.view(6, 48), x, weight, scale, (16, 32), bias)
    empty = fp8_w8a16_linear(x[:0], weight, scale, (16, 32), bias)
    assert empty.shape == (0, 48)


def test_fp8_w8a16_checks_its_arguments():
    x, weight, scale, _ = _case(2, 48, 64, (16, 32), torch.float32)
    with pytest.raises(ValueError, match=r"scale must be \[3, 2\] .* got \(2, 2\)"):
        fp8_w8a16_linear(x, weight, scale[:2], (16, 32))
    with pytest.raises(ValueError, match="weight must be float8_e4m3fn"):
        fp8_w8a16_linear(x, weight.float(), scale, (16, 32))
    with pytest.raises(ValueError, match="x has 63 features, the weight 64"):
        fp8_w8a16_linear(x[:, :63], weight, scale, (16, 32))


def test_dispatch_runs_torch_on_cpu_and_triton_when_asked():
    x, weight, scale, bias = _case(3, 40, 64, (1, 64), torch.float32)
    torch_out = dispatch.fp8_linear(x.cpu(), weight.cpu(), scale.cpu(), (1, 64), bias.cpu())
    _check(torch_out, x.cpu(), weight.cpu(), scale.cpu(), (1, 64), bias.cpu())
    triton_out = dispatch.fp8_linear(x, weight, scale, (1, 64), bias, backend="triton")
    if dispatch.fp8_gemm_kind(x, (1, 64), backend="triton") == "w8a16":  # else: W8A8's test
        _check(triton_out, x, weight, scale, (1, 64), bias)


def test_reference_dequantizes_block_by_block():
    weight = torch.randn(5, 7).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    deq = fp8_dequantize_ref(weight, scale, (3, 3))
    for i in range(5):
        for j in range(7):
            assert deq[i, j] == weight[i, j].float() * scale[i // 3, j // 3]


@requires_compiled_gpu
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096)])
def test_fp8_w8a16_bf16_on_gpu(shape):
    m, n, k = shape
    block = (128, 128)
    x, weight, scale, bias = _case(m, n, k, block, torch.bfloat16)
    out = fp8_w8a16_linear(x, weight, scale, block, bias)
    expected = fp8_linear_ref(x.float(), weight, scale, block, bias.float())
    torch.testing.assert_close(out.float(), expected, atol=1e-1, rtol=2e-2)
