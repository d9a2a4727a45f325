"""W4A16 int4 GEMM kernel vs its torch reference: group sizes 32 / 64 / 128, a group that is
not a multiple of the K tile (per-element scales), per-channel (one group), M = 1 and ragged M,
N not a multiple of the tile, the decode (split K) and prefill launch shapes."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch
from splitserve.kernels.reference import (
    int4_pack_k,
    int4_unpack_k,
    w4a16_dequantize_ref,
    w4a16_linear_ref,
)
from splitserve.kernels.w4a16_gemm import DECODE_MAX_M, launch_shape, w4a16_linear

from .kernel_test_utils import DEVICE, DTYPES, requires_compiled_gpu

# (atol, rtol) against the fp32 reference on the same (dtype-rounded) inputs: the kernel scales
# each K tile's partial product and sums in another order (split K adds partial sums); fp16
# rounds the output once.
GEMM_TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 2e-2),
}

# (M, N, K, group)
SHAPES = [
    (1, 64, 128, 32),
    (1, 70, 256, 128),  # N ragged against the 64-wide tile
    (3, 100, 192, 64),  # three groups of 64; M ragged
    (16, 48, 128, 128),  # the largest decode shape: one group
    (17, 40, 256, 32),  # the smallest prefill shape
    (70, 130, 128, 64),
    (5, 72, 96, 96),  # per channel: one group of 96, K tiles of 32
    (9, 56, 64, 16),  # a group smaller than the K tile: per-element scales
    (2, 24, 160, 40),  # a group not a multiple of 8 nor of the tile
]


def _case(m: int, n: int, k: int, group: int, dtype: torch.dtype):
    q = torch.randint(0, 16, (n, k), device=DEVICE)
    qweight = int4_pack_k(q)
    scales = (torch.rand(-(-k // group), n, device=DEVICE) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, scales.shape, device=DEVICE).to(dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    return x, qweight, scales, zeros, bias


def _check(out, x, qweight, scales, zeros, group, bias):
    expected = w4a16_linear_ref(
        x.float(), qweight, scales.float(), zeros.float(), group,
        None if bias is None else bias.float(),
    )  # fmt: skip
    atol, rtol = GEMM_TOL[x.dtype]
    assert out.dtype == x.dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_w4a16_matches_reference(shape, dtype):
    m, n, k, group = shape
    x, qweight, scales, zeros, bias = _case(m, n, k, group, dtype)
    _check(w4a16_linear(x, qweight, scales, zeros, group, bias), x, qweight, scales, zeros, group, bias)  # fmt: skip
    _check(w4a16_linear(x, qweight, scales, zeros, group), x, qweight, scales, zeros, group, None)


@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
def test_w4a16_decode_split_k(split_k):
    """Every split of K gives the same product (bias added once, ragged last split)."""
    x, qweight, scales, zeros, bias = _case(4, 72, 320, 32, torch.float32)
    out = w4a16_linear(x, qweight, scales, zeros, 32, bias, split_k=split_k)
    _check(out, x, qweight, scales, zeros, 32, bias)


def test_launch_shapes():
    assert launch_shape(1, 4096, 4096, 128) == (16, 64, 128, 4)  # 64 N tiles x 4 K splits
    assert launch_shape(DECODE_MAX_M + 1, 4096, 4096, 128)[3] == 1
    assert launch_shape(256, 4096, 4096, 32)[:3] == (128, 128, 32)


def test_pack_layout_is_sequential_along_k():
    q = torch.arange(16).repeat(2, 1)  # [2, 16]: 0..15 in each row
    packed = int4_pack_k(q)
    assert packed.shape == (2, 2)
    assert packed[0, 0] == 0x76543210 and packed[0, 1] == 0x76543210
    assert torch.equal(packed[1], torch.tensor([-0x01234568, -0x01234568], dtype=torch.int32))
    assert torch.equal(int4_unpack_k(packed), q)


def test_reference_dequantizes_group_by_group():
    q = torch.randint(0, 16, (3, 16))
    scales = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # [K / 8, N]
    zeros = torch.tensor([[0.0, 8.0, 15.0], [3.0, 3.0, 3.0]])
    deq = w4a16_dequantize_ref(int4_pack_k(q), scales, zeros, 8)
    for n in range(3):
        for k in range(16):
            assert deq[n, k] == (q[n, k] - zeros[k // 8, n]) * scales[k // 8, n]


def test_w4a16_batched_input_and_empty_rows():
    x, qweight, scales, zeros, bias = _case(6, 48, 64, 32, torch.float32)
    out = w4a16_linear(x.view(2, 3, 64), qweight, scales, zeros, 32, bias)
    assert out.shape == (2, 3, 48)
    _check(out.view(6, 48), x, qweight, scales, zeros, 32, bias)
    assert w4a16_linear(x[:0], qweight, scales, zeros, 32, bias).shape == (0, 48)


def test_w4a16_checks_its_arguments():
    x, qweight, scales, zeros, _ = _case(2, 48, 64, 32, torch.float32)
    with pytest.raises(ValueError, match=r"scales must be \[2, 48\], got \(1, 48\)"):
        w4a16_linear(x, qweight, scales[:1], zeros, 32)
    with pytest.raises(ValueError, match=r"qweight must be \[8, N\] for x with 64 features"):
        w4a16_linear(x, qweight[:7], scales, zeros, 32)
    with pytest.raises(ValueError, match="qweight must have dtype"):
        w4a16_linear(x, qweight.float(), scales, zeros, 32)


def test_dispatch_runs_torch_on_cpu_and_triton_when_asked():
    x, qweight, scales, zeros, bias = _case(3, 40, 64, 32, torch.float32)
    args = (qweight, scales, zeros, 32, bias)
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    _check(dispatch.w4a16_linear(x.cpu(), *cpu_args), x.cpu(), *cpu_args)
    _check(dispatch.w4a16_linear(x, *args, backend="triton"), x, *args)


@requires_compiled_gpu
@pytest.mark.parametrize("m", [1, 16, 256])
def test_w4a16_bf16_on_gpu(m):
    x, qweight, scales, zeros, bias = _case(m, 4096, 4096, 128, torch.bfloat16)
    _check(w4a16_linear(x, qweight, scales, zeros, 128, bias), x, qweight, scales, zeros, 128, bias)  # fmt: skip
