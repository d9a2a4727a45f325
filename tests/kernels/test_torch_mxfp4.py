"""MXFP4 decoding (the CPU path and the kernels' reference) against the OCP definition and
transformers' own MXFP4 dequantization."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.torch_moe import fused_moe_torch
from splitserve.kernels.torch_mxfp4 import dequantize_mxfp4, e2m1_values, fused_moe_mxfp4_torch
from splitserve.testing import mxfp4_pack

# The OCP MX spec's e2m1 table, by code.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_every_code_decodes_to_its_e2m1_value():
    assert e2m1_values().tolist() == E2M1
    assert torch.equal(torch.signbit(e2m1_values()), torch.tensor([False] * 8 + [True] * 8))
    # every byte value: low nibble is the even element, high nibble the odd one
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 1, 16)
    scales = torch.full((16, 1), 127, dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, scales).reshape(256, 2)
    for byte in range(256):
        assert out[byte].tolist() == [E2M1[byte & 15], E2M1[byte >> 4]]


@pytest.mark.parametrize("scale", [0, 1, 100, 126, 127, 128, 200, 254])
def test_e8m0_scales_including_the_extremes(scale):
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 1, 16)
    scales = torch.full((16, 1), scale, dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, scales).reshape(-1)
    codes = torch.stack([blocks & 15, blocks >> 4], -1).reshape(-1).long()
    expected = (torch.tensor(E2M1, dtype=torch.float64)[codes] * 2.0 ** (scale - 127)).float()
    assert torch.equal(out, expected)  # exact: fp32 holds every product (subnormals included)
    # the largest code (6) times 2^(s - 127); past float32's range (s = 254) that is inf
    assert out.abs().max() == torch.tensor(6.0 * 2.0 ** (scale - 127), dtype=torch.float64).float()


def test_matches_transformers_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 10, 4), generator=gen, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]
    assert torch.equal(dequantize_mxfp4(blocks, scales), theirs.transpose(1, 2))


def test_packer_round_trips_through_the_decoder():
    w = torch.randn(2, 6, 64) * torch.logspace(-3, 1, 6)[None, :, None]
    blocks, scales = mxfp4_pack.quantize(w)
    assert blocks.shape == (2, 6, 2, 16) and scales.shape == (2, 6, 2)
    assert torch.equal(dequantize_mxfp4(blocks, scales), mxfp4_pack.dequantize(blocks, scales))
    error = (dequantize_mxfp4(blocks, scales) - w).abs()
    # e2m1's widest step is 2 (between 4 and 6): at most 1 * 2^e with 6 * 2^e >= |max|
    bound = (w.unflatten(-1, (2, 32)).abs().amax(-1, keepdim=True) / 3).expand(-1, -1, -1, 32)
    assert (error <= bound.flatten(-2) + 1e-12).all()


def test_shapes_must_pair():
    with pytest.raises(ValueError, match="do not pair"):
        dequantize_mxfp4(
            torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8)
        )


def test_fused_moe_on_mxfp4_equals_the_dequantized_moe():
    gen = torch.Generator().manual_seed(1)
    e, h, i, t = 4, 64, 32, 9
    w13 = mxfp4_pack.quantize(torch.randn(e, 2 * i, h, generator=gen) * 0.2)
    w2 = mxfp4_pack.quantize(torch.randn(e, h, i, generator=gen) * 0.2)
    x = torch.randn(t, h, generator=gen)
    ids = torch.rand(t, e, generator=gen).topk(2, -1).indices
    weights = torch.rand(t, 2, generator=gen)
    extra = dict(b13=torch.randn(e, 2 * i, generator=gen), b2=torch.randn(e, h, generator=gen))
    out = fused_moe_mxfp4_torch(x, *w13, *w2, weights, ids, swiglu_limit=2.0, **extra)
    dense = fused_moe_torch(
        x, dequantize_mxfp4(*w13), dequantize_mxfp4(*w2), weights, ids, swiglu_limit=2.0, **extra
    )
    assert torch.equal(out, dense)
