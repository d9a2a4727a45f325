"""Backend selection, and the op functions the worker calls: torch path vs reference, Triton
path (forced, in the interpreter) vs reference, and no Triton on CPU tensors by default."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch, reference
from splitserve.kernels.torch_attention import paged_attention_torch

from .kernel_test_utils import ATTN_TOL, DEVICE, DTYPES, TOL, assert_close, make_paged_batch

MIXED_SPECS = [(3, 13), (6, 9), (1, 40), (20, 0), (1, 0)]
DECODE_SPECS = [(1, 8), (1, 9), (1, 40), (1, 0), (1, 3)]
FEATURES = [
    {},
    {"sliding_window": 4},
    {"soft_cap": 2.0},
    {"sinks": True},
    {"sliding_window": 6, "soft_cap": 3.0, "sinks": True},
]


def _batch(specs, dtype, heads=(6, 2), head_dim=64, **kw):
    return make_paged_batch(
        specs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, block_size=4,
        dtype=dtype, shared_prefix_blocks=2, q_scale=2.0, **kw,
    )  # fmt: skip


def _features(kw: dict, num_heads: int) -> dict:
    kw = dict(kw)
    if kw.get("sinks"):
        kw["sinks"] = torch.randn(num_heads, device=DEVICE)
    return kw


# --------------------------------------------------------------------------- backend choice


def test_select_backend_auto_follows_device():
    assert dispatch.select_attention_backend("auto", torch.device("cpu")) == "torch"
    assert dispatch.select_attention_backend("AUTO", "cuda") == "triton"
    assert dispatch.select_attention_backend("torch", "cuda") == "torch"
    assert dispatch.select_attention_backend("triton", "cuda:0") == "triton"


def test_select_backend_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA device"):
        dispatch.select_attention_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select_attention_backend("triton", "cpu") == "triton"


def test_select_backend_rejects_unknown_and_missing_triton(monkeypatch):
    with pytest.raises(ValueError, match="attention-backend"):
        dispatch.select_attention_backend("flashinfer", "cpu")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="not installed"):
        dispatch.select_attention_backend("triton", "cuda")
    assert dispatch.select_attention_backend("auto", "cuda") == "torch"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU routing")
def test_cpu_tensors_never_reach_triton(monkeypatch):
    def boom(name):
        raise AssertionError(f"triton module {name} used for CPU tensors")

    monkeypatch.setattr(dispatch, "_kernel_module", boom)
    b = _batch(MIXED_SPECS, torch.float32)
    dispatch.paged_attention(*b.attention_args(), 0.1)
    x = torch.randn(3, 16)
    dispatch.rms_norm(x, torch.ones(16), 1e-6)
    dispatch.fused_add_rms_norm(x, x, torch.ones(16), 1e-6)
    dispatch.silu_and_mul(x)
    dispatch.gelu_and_mul(x, "tanh")
    dispatch.apply_token_bitmask(x, torch.zeros(3, 1, dtype=torch.int32))
    q = torch.randn(3, 2, 16)
    dispatch.apply_rotary(torch.arange(3), q, q.clone(), torch.randn(4, 8))
    cache = torch.zeros(2, 4, 2, 16)
    dispatch.write_kv_cache(q, q, cache, cache.clone(), torch.arange(3))
    w13, w2 = torch.randn(4, 8, 16), torch.randn(4, 16, 4)
    dispatch.fused_moe(x, w13, w2, torch.rand(3, 2), torch.tensor([[0, 1], [1, 2], [3, 0]]))


# --------------------------------------------------------------------------- attention paths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", range(len(FEATURES)))
@pytest.mark.parametrize("specs", [MIXED_SPECS, DECODE_SPECS], ids=["mixed", "decode"])
def test_torch_attention_path_matches_reference(specs, feature, dtype):
    """The CPU path batches decode rows through one padded SDPA; NaN-poisoned holes and slots
    past each sequence's end must not leak into it."""
    b = _batch(specs, dtype)
    kw = _features(FEATURES[feature], 6)
    out = paged_attention_torch(*b.attention_args(), 0.125, **kw)
    assert_close(out, reference.paged_attention_ref(*b.attention_args(), 0.125, **kw), ATTN_TOL)


@pytest.mark.parametrize("heads", [(4, 4), (4, 1)])
def test_torch_attention_path_padding_row_and_out(heads):
    b = _batch(DECODE_SPECS, torch.float32, heads=heads, head_dim=80)
    b.seq_lens[3] = 0
    out = torch.full_like(b.q, 7.0)
    dispatch.paged_attention(*b.attention_args(), 0.1, out=out, backend="torch")
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    assert_close(out, reference.paged_attention_ref(*b.attention_args(), 0.1), ATTN_TOL)


@pytest.mark.parametrize("specs", [MIXED_SPECS, DECODE_SPECS], ids=["mixed", "decode"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dispatch_paged_attention(specs, backend):
    """Decode-only batches take the split-KV kernel, mixed ones the varlen kernel."""
    b = _batch(specs, torch.float16)
    kw = _features(FEATURES[-1], 6)
    out = dispatch.paged_attention(*b.attention_args(), 0.125, backend=backend, **kw)
    assert_close(out, reference.paged_attention_ref(*b.attention_args(), 0.125, **kw), ATTN_TOL)


def test_dispatch_decode_uses_split_kv(monkeypatch):
    from splitserve.kernels import attention_decode

    calls = []
    real = attention_decode.paged_attention_decode
    monkeypatch.setattr(
        attention_decode, "paged_attention_decode", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    b = _batch(DECODE_SPECS, torch.float32)
    dispatch.paged_attention(*b.attention_args(), 0.1, max_seq_len=b.max_seq_len, backend="triton")
    assert calls and calls[0]["max_seq_len"] == b.max_seq_len


# --------------------------------------------------------------------------- elementwise ops


@pytest.mark.parametrize("backend", ["triton", "torch", None])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dispatch_elementwise_ops(backend, dtype):
    x = (torch.randn(5, 48, device=DEVICE) * 2).to(dtype)
    res = torch.randn(5, 48, device=DEVICE).to(dtype)
    w = torch.randn(48, device=DEVICE).to(dtype)
    assert_close(
        dispatch.rms_norm(x, w, 1e-6, backend=backend), reference.rms_norm_ref(x, w, 1e-6), TOL
    )
    # x is consumed (the torch path adds into it): hand it a copy.
    normed, new_res = dispatch.fused_add_rms_norm(x.clone(), res, w, 1e-6, backend=backend)
    normed_ref, res_ref = reference.fused_add_rms_norm_ref(x, res, w, 1e-6)
    assert_close(normed, normed_ref, TOL)
    assert torch.equal(new_res, res_ref)
    assert_close(dispatch.silu_and_mul(x, backend=backend), reference.silu_and_mul_ref(x), TOL)
    assert_close(
        dispatch.gelu_and_mul(x, "tanh", backend=backend),
        reference.gelu_and_mul_ref(x, "tanh"),
        TOL,
    )

    logits = torch.randn(5, 70, device=DEVICE).to(dtype)
    mask = torch.randint(-(2**31), 2**31, (5, 3), dtype=torch.int64).to(torch.int32).to(DEVICE)
    expected = logits.clone()
    reference.apply_token_bitmask_ref(expected, mask)
    dispatch.apply_token_bitmask(logits, mask, backend=backend)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("is_neox", [True, False])
def test_dispatch_rotary_in_place_partial(backend, is_neox):
    q = torch.randn(4, 3, 64, device=DEVICE)
    k = torch.randn(4, 1, 64, device=DEVICE)
    positions = torch.randint(0, 16, (4,), device=DEVICE)
    cache = torch.randn(16, 32, device=DEVICE)
    q_ref, k_ref = reference.apply_rotary_ref(positions, q, k, cache, is_neox)
    q_out, k_out = dispatch.apply_rotary(positions, q, k, cache, is_neox, backend=backend)
    assert q_out is q and k_out is k
    assert_close(q, q_ref, TOL)
    assert_close(k, k_ref, TOL)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dispatch_write_kv_cache(backend):
    key = torch.randn(6, 2, 64, device=DEVICE)
    value = torch.randn(6, 2, 64, device=DEVICE)
    slots = torch.tensor([5, -1, 0, 11, -1, 2], device=DEVICE)
    kc, vc = torch.zeros(3, 4, 2, 64, device=DEVICE), torch.zeros(3, 4, 2, 64, device=DEVICE)
    dispatch.write_kv_cache(key, value, kc, vc, slots, backend=backend)
    assert torch.equal(kc[1, 1], key[0]) and torch.equal(vc[2, 3], value[3])
    assert torch.equal(kc[0, 0], key[2]) and torch.equal(kc[0, 2], key[5])
    assert kc.count_nonzero() == 4 * 2 * 64
