"""An FP8 KV cache (`--kv-cache-dtype fp8`): the Triton KV write and both Triton attention
kernels, and the torch path, against the reference attention over the dequantized cache.

The cache holds x / scale rounded to FP8 (saturated); reading multiplies by the scale, so every
path must give what the fp32 reference gives on `kv_dequantize_ref(cache)`. Unowned cache
slots hold NaN (NaN survives FP8), so a read outside a sequence's blocks still shows up.
"""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch
from splitserve.kernels.attention_decode import paged_attention_decode
from splitserve.kernels.attention_prefill import paged_attention_prefill
from splitserve.kernels.kv_cache import write_kv_cache
from splitserve.kernels.reference import (
    kv_dequantize_ref,
    kv_quantize_ref,
    paged_attention_ref,
)
from splitserve.kernels.torch_attention import paged_attention_torch, write_kv_cache_torch

from .kernel_test_utils import ATTN_TOL, DEVICE, DTYPES, make_paged_batch

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
SCALES = (0.05, 0.02)  # (k, v): values past 448 * scale saturate in e4m3
# Outputs reach ~9 here (values of up to 448 * 0.02), so the attention tolerances scale up:
# the same relative summation-order noise, larger numbers.
FP8_ATTN_TOL = {dtype: (5 * atol, 5 * rtol) for dtype, (atol, rtol) in ATTN_TOL.items()}
SCALE = 32**-0.5


def _fp8_batch(specs, cache_dtype, q_dtype, k_scale=SCALES[0], v_scale=SCALES[1], heads=(4, 2)):
    batch = make_paged_batch(
        specs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=32, block_size=16,
        dtype=torch.float32,
    )  # fmt: skip
    batch.key_cache = kv_quantize_ref(batch.key_cache * 8, cache_dtype, k_scale).to(DEVICE)
    batch.value_cache = kv_quantize_ref(batch.value_cache * 8, cache_dtype, v_scale).to(DEVICE)
    batch.q = batch.q.to(q_dtype).to(DEVICE)
    for name in ("block_tables", "seq_lens", "cu_seqlens_q"):
        setattr(batch, name, getattr(batch, name).to(DEVICE))
    return batch


def _reference(batch, k_scale=SCALES[0], v_scale=SCALES[1]):
    key = kv_dequantize_ref(batch.key_cache, k_scale, torch.float32)
    value = kv_dequantize_ref(batch.value_cache, v_scale, torch.float32)
    return paged_attention_ref(
        batch.q.float(), key, value, batch.block_tables, batch.seq_lens, batch.cu_seqlens_q,
        SCALE,
    )  # fmt: skip


def test_quantize_saturates_and_round_trips():
    x = torch.tensor([0.01, -1.0, 20.0, -500.0])
    q = kv_quantize_ref(x, torch.float8_e4m3fn, 0.05)
    assert q.dtype == torch.float8_e4m3fn
    back = kv_dequantize_ref(q, 0.05, torch.float32)
    assert back[3] == -448 * 0.05  # saturated, not NaN or inf
    torch.testing.assert_close(back[:3], x[:3], atol=0.01, rtol=0.07)


@pytest.mark.parametrize("cache_dtype", FP8, ids=str)
@pytest.mark.parametrize("writer", ["triton", "torch"])
def test_kv_write_stores_scaled_fp8(cache_dtype, writer):
    tokens, heads, dim, blocks, bs = 7, 2, 32, 4, 16
    key = torch.randn(tokens, heads, dim, device=DEVICE) * 10
    key[0, 0, 0] = 1e4  # saturates
    value = torch.randn(tokens, heads, dim, device=DEVICE)
    slots = torch.tensor([3, 17, -1, 40, 41, 63, 0], device=DEVICE)
    shape = (blocks, bs, heads, dim)
    key_cache = torch.zeros(shape, dtype=cache_dtype, device=DEVICE)
    value_cache = torch.zeros(shape, dtype=cache_dtype, device=DEVICE)
    write = write_kv_cache if writer == "triton" else write_kv_cache_torch
    write(key, value, key_cache, value_cache, slots, 0.05, 0.02)
    keep = slots >= 0
    flat_k, flat_v = key_cache.view(-1, heads, dim), value_cache.view(-1, heads, dim)
    expected_k = kv_quantize_ref(key[keep], cache_dtype, 0.05)
    expected_v = kv_quantize_ref(value[keep], cache_dtype, 0.02)
    assert torch.equal(flat_k[slots[keep]].view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(flat_v[slots[keep]].view(torch.uint8), expected_v.view(torch.uint8))
    assert torch.isfinite(flat_k[slots[keep]].float()).all()


SPECS = [(1, 40), (1, 0), (1, 17), (1, 100)]
PREFILL_SPECS = [(20, 0), (5, 33), (1, 60), (37, 16)]


@pytest.mark.parametrize("cache_dtype", FP8, ids=str)
@pytest.mark.parametrize("q_dtype", DTYPES, ids=str)
def test_decode_kernel_reads_fp8(cache_dtype, q_dtype):
    batch = _fp8_batch(SPECS, cache_dtype, q_dtype)
    out = paged_attention_decode(
        *batch.attention_args(), SCALE, k_scale=SCALES[0], v_scale=SCALES[1]
    )
    atol, rtol = FP8_ATTN_TOL[q_dtype]
    torch.testing.assert_close(out.float(), _reference(batch), atol=atol, rtol=rtol)


@pytest.mark.parametrize("cache_dtype", FP8, ids=str)
@pytest.mark.parametrize("q_dtype", DTYPES, ids=str)
def test_prefill_kernel_reads_fp8(cache_dtype, q_dtype):
    batch = _fp8_batch(PREFILL_SPECS, cache_dtype, q_dtype)
    out = paged_attention_prefill(
        *batch.attention_args(), SCALE, k_scale=SCALES[0], v_scale=SCALES[1]
    )
    atol, rtol = FP8_ATTN_TOL[q_dtype]
    torch.testing.assert_close(out.float(), _reference(batch), atol=atol, rtol=rtol)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_kernels_decode_e4m3_bytes(kernel, q_dtype, monkeypatch):
    """The path GPUs below sm_89 take (Triton has no e4m3 type there): the cache goes in as
    its bytes and the kernels decode them; the result must not change."""
    from splitserve.kernels import attention_decode, attention_prefill
    from splitserve.kernels._checks import FP8_E4M3_BYTES

    module = attention_decode if kernel == "decode" else attention_prefill
    batch = _fp8_batch(SPECS if kernel == "decode" else PREFILL_SPECS, FP8[0], q_dtype)
    run = module.paged_attention_decode if kernel == "decode" else module.paged_attention_prefill
    native = run(*batch.attention_args(), SCALE, k_scale=SCALES[0], v_scale=SCALES[1])
    seen = []

    def as_bytes(t):
        seen.append(t.dtype)
        return t.view(torch.uint8), FP8_E4M3_BYTES

    monkeypatch.setattr(module, "fp8_operand", as_bytes)
    out = run(*batch.attention_args(), SCALE, k_scale=SCALES[0], v_scale=SCALES[1])
    assert seen == [torch.float8_e4m3fn] * 2  # the key and the value cache
    torch.testing.assert_close(out, native, atol=0, rtol=0)


def test_scales_matter():
    """The kernels multiply by the scales they are given (not 1.0, not each other's)."""
    batch = _fp8_batch(SPECS, torch.float8_e4m3fn, torch.float32)
    swapped = paged_attention_decode(*batch.attention_args(), SCALE, k_scale=0.02, v_scale=0.05)
    assert not torch.allclose(swapped, _reference(batch), atol=1e-2)


@pytest.mark.parametrize("cache_dtype", FP8, ids=str)
@pytest.mark.parametrize("specs", [SPECS, PREFILL_SPECS], ids=["decode", "mixed"])
def test_torch_path_reads_fp8(cache_dtype, specs):
    batch = _fp8_batch(specs, cache_dtype, torch.float32)
    out = paged_attention_torch(
        *batch.attention_args(), SCALE, k_scale=SCALES[0], v_scale=SCALES[1]
    )
    torch.testing.assert_close(out, _reference(batch), atol=1.5e-4, rtol=1.5e-4)


def test_torch_path_rounds_a_steps_own_keys_as_the_cache_does():
    """A prompt with no cached prefix attends over this step's keys directly; with an FP8
    cache it must see them as stored (rounded), or its first token would differ from what a
    cache read gives."""
    cache_dtype = torch.float8_e4m3fn
    tokens, heads, dim, bs = 20, 2, 32, 16
    key = torch.randn(tokens, heads, dim) * 4
    value = torch.randn(tokens, heads, dim)
    q = torch.randn(tokens, 4, dim)
    key_cache = torch.zeros(2, bs, heads, dim, dtype=cache_dtype)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.arange(tokens)
    write_kv_cache_torch(key, value, key_cache, value_cache, slots, *SCALES)
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    lens, cu = (
        torch.tensor([tokens], dtype=torch.int32),
        torch.tensor([0, tokens], dtype=torch.int32),
    )
    args = (q, key_cache, value_cache, tables, lens, cu, dim**-0.5)
    direct = paged_attention_torch(
        *args, key=key, value=value, k_scale=SCALES[0], v_scale=SCALES[1]
    )
    from_cache = paged_attention_torch(*args, k_scale=SCALES[0], v_scale=SCALES[1])
    torch.testing.assert_close(direct, from_cache, atol=1e-5, rtol=1e-5)


def test_dispatch_passes_the_scales():
    batch = _fp8_batch(PREFILL_SPECS, torch.float8_e4m3fn, torch.float32)
    for backend in ("torch", "triton"):
        out = dispatch.paged_attention(
            *batch.attention_args(), SCALE, backend=backend, k_scale=SCALES[0], v_scale=SCALES[1]
        )
        torch.testing.assert_close(out, _reference(batch), atol=1.5e-4, rtol=1.5e-4)
