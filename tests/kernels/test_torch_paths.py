"""The CPU (torch) paths behind dispatch, beyond the shared reference checks: the attention
plan shared across layers, this step's keys passed in, the cache-free mode, the KV write's
fallbacks, and the elementwise ops' in-place conventions."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import reference, torch_ops
from splitserve.kernels.torch_attention import (
    TorchAttentionPlan,
    paged_attention_torch,
    write_kv_cache_torch,
)

from .kernel_test_utils import ATTN_TOL, TOL, assert_close, make_paged_batch

# Decodes of very different lengths, given out of order, around two prefills.
SPREAD_SPECS = [(1, 90), (1, 3), (5, 0), (1, 60), (1, 7), (3, 20), (1, 95), (1, 2)]


def _batch(specs, dtype=torch.float32, heads=(6, 2), **kw):
    return make_paged_batch(
        specs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=32, block_size=4,
        dtype=dtype, **kw,
    )  # fmt: skip


def _dense_kv(b):
    """This step's keys/values [T, Hk, D], as a layer would pass them (the last query_len
    positions of each sequence)."""
    keys = [k[k.shape[0] - n :] for k, n in zip(b.keys, b.query_lens, strict=True)]
    values = [v[v.shape[0] - n :] for v, n in zip(b.values, b.query_lens, strict=True)]
    return torch.cat(keys).to(b.q.device), torch.cat(values).to(b.q.device)


def test_one_plan_serves_layers_with_different_windows():
    """Layers share the step's plan; each sliding window gets its own gather layout."""
    b = _batch(SPREAD_SPECS)
    plan = TorchAttentionPlan(b.seq_lens, b.cu_seqlens_q, b.block_tables, 4)
    assert len(plan.decode_runs) > 1 and plan.num_decodes == 6
    for window in (None, 5, None, 17):
        out = paged_attention_torch(*b.attention_args(), 0.2, sliding_window=window, plan=plan)
        expected = reference.paged_attention_ref(*b.attention_args(), 0.2, sliding_window=window)
        assert_close(out, expected, ATTN_TOL)
    assert all(set(run.layouts) == {None, 5, 17} for run in plan.decode_runs)


def test_new_keys_passed_in_skip_the_cache_for_fresh_prompts():
    """Prompts without a cached prefix attend over the keys handed in, not the cache: a cache
    of NaN cannot reach them."""
    b = _batch([(5, 0), (9, 0), (1, 0)])
    expected = reference.paged_attention_ref(*b.attention_args(), 0.3)
    key, value = _dense_kv(b)
    poisoned = torch.full_like(b.key_cache, float("nan"))
    out = paged_attention_torch(
        b.q, poisoned, poisoned, b.block_tables, b.seq_lens, b.cu_seqlens_q, 0.3,
        key=key, value=value,
    )  # fmt: skip
    # the one-token prompt is batched as a decode, which reads the cache: only the others
    # are checked against the reference, the decode row against a cache-free run
    assert_close(out[:14], expected[:14], ATTN_TOL)
    cache_free = paged_attention_torch(
        b.q, None, None, None, b.seq_lens, b.cu_seqlens_q, 0.3, key=key, value=value
    )
    assert_close(cache_free, expected, ATTN_TOL)


@pytest.mark.parametrize("feature", [{}, {"soft_cap": 3.0}, {"sliding_window": 4}])
def test_cache_free_forward(feature):
    """No cache at all (the memory profile's forward): every sequence is all new."""
    b = _batch([(7, 0), (1, 0), (12, 0)], heads=(4, 4))
    key, value = _dense_kv(b)
    out = paged_attention_torch(
        b.q, None, None, None, b.seq_lens, b.cu_seqlens_q, 0.25, key=key, value=value, **feature
    )
    assert_close(out, reference.paged_attention_ref(*b.attention_args(), 0.25, **feature), ATTN_TOL)
    with pytest.raises(ValueError, match="key_cache or"):
        paged_attention_torch(b.q, None, None, None, b.seq_lens, b.cu_seqlens_q, 0.25)


def test_write_kv_cache_torch_strided_cache_and_int32_slots():
    key, value = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([3, -1, 0, 9, 4], dtype=torch.int32)
    base = torch.zeros(3, 2, 4, 8)  # [NB, Hk, BS, D] seen as [NB, BS, Hk, D]: not contiguous
    kc, vc = base.transpose(1, 2), base.clone().transpose(1, 2)
    expected_k, expected_v = kc.clone(), vc.clone()
    reference.write_kv_cache_ref(key, value, expected_k, expected_v, slots)
    write_kv_cache_torch(key, value, kc, vc, slots)
    assert torch.equal(kc, expected_k) and torch.equal(vc, expected_v)
    flat_k, flat_v = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    write_kv_cache_torch(key, value, flat_k, flat_v, slots)
    assert torch.equal(flat_k, expected_k) and torch.equal(flat_v, expected_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_on_fused_qkv_rows(dtype, is_neox):
    """q and k as views of one fused qkv row rotate together (one pass), v untouched; partial
    rotary leaves the tail of each head alone."""
    t, hq, hk, d, rot = 5, 4, 2, 32, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d).to(dtype)
    original = qkv.clone()
    q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    assert torch_ops._joint_view(q, k) is not None
    positions = torch.randint(0, 40, (t,))
    cache = torch.randn(40, rot)
    q_ref, k_ref = reference.apply_rotary_ref(positions, q.clone(), k.clone(), cache, is_neox)
    torch_ops.apply_rotary(positions, q, k, cache, is_neox)
    assert_close(q, q_ref, TOL)
    assert_close(k, k_ref, TOL)
    assert torch.equal(qkv[:, (hq + hk) * d :], original[:, (hq + hk) * d :])
    assert torch_ops._joint_view(k, q) is None  # wrong order: two passes


def test_fused_add_rms_norm_consumes_x():
    x, res, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    expected = reference.fused_add_rms_norm_ref(x, res, w, 1e-6)
    res_before = res.clone()
    normed, new_res = torch_ops.fused_add_rms_norm(x, res, w, 1e-6)
    assert new_res is x  # the sum lives in x now
    assert torch.equal(res, res_before)
    assert_close(normed, expected[0], TOL)
    assert_close(new_res, expected[1], TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_norm_and_activation(dtype):
    x = (torch.randn(4, 64) * 3).to(dtype)
    w = torch.randn(64).to(dtype)
    assert_close(torch_ops.rms_norm(x, w, 1e-5), reference.rms_norm_ref(x, w, 1e-5), TOL)
    g = torch.randn(4, 128).to(dtype)
    before = g.clone()
    assert_close(torch_ops.silu_and_mul(g), reference.silu_and_mul_ref(g), TOL)
    assert torch.equal(g, before)


def test_strided_cache_layout():
    """Caches that are views with other strides (say a [NB, Hk, BS, D] buffer seen as
    [NB, BS, Hk, D]) take the slower indexing route, same results."""
    b = _batch(SPREAD_SPECS)
    kc = b.key_cache.transpose(1, 2).contiguous().transpose(1, 2)
    vc = b.value_cache.transpose(1, 2).contiguous().transpose(1, 2)
    assert not kc.is_contiguous()
    args = (b.q, kc, vc, b.block_tables, b.seq_lens, b.cu_seqlens_q)
    for window in (None, 6):
        out = paged_attention_torch(*args, 0.2, sliding_window=window)
        expected = reference.paged_attention_ref(*b.attention_args(), 0.2, sliding_window=window)
        assert_close(out, expected, ATTN_TOL)


def test_kv_write_clears_fresh_blocks():
    """A token at offset 0 starts its block: the rest of the block is cleared first, so a
    previous owner's leftovers (here NaN) never sit past a sequence's last token."""
    kc, vc = torch.full((3, 4, 1, 8), float("nan")), torch.full((3, 4, 1, 8), float("nan"))
    key, value = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    write_kv_cache_torch(key, value, kc, vc, torch.tensor([4, 5, 10]))  # block 1 from offset 0
    assert torch.equal(kc[1, :2], key[:2]) and torch.equal(kc[1, 2:], torch.zeros(2, 1, 8))
    assert torch.equal(vc[1, :2], value[:2]) and torch.equal(vc[1, 2:], torch.zeros(2, 1, 8))
    assert torch.equal(kc[2, 2], key[2]) and kc[2, 3].isnan().all()  # not a fresh block


def test_clean_tails_after_writes_through_the_torch_path():
    """The worker's mode: every token went through `write_kv_cache_torch`, in order, into a
    cache full of NaN; the plan then skips clearing tails after its gathers."""
    b = _batch(SPREAD_SPECS)
    key_cache = torch.full_like(b.key_cache, float("nan"))
    value_cache = torch.full_like(b.value_cache, float("nan"))
    for i, (k, v) in enumerate(zip(b.keys, b.values, strict=True)):
        pos = torch.arange(k.shape[0], device=b.q.device)
        slots = b.block_tables[i, pos // 4].long() * 4 + pos % 4
        for start in range(0, k.shape[0], 3):  # a few tokens per step, as chunks and decodes
            part = slice(start, start + 3)
            kd, vd = k[part].to(b.q.device), v[part].to(b.q.device)
            write_kv_cache_torch(kd, vd, key_cache, value_cache, slots[part])
    plan = TorchAttentionPlan(b.seq_lens, b.cu_seqlens_q, b.block_tables, 4, clean_tails=True)
    args = (b.q, key_cache, value_cache, b.block_tables, b.seq_lens, b.cu_seqlens_q)
    for window in (None, 6):
        out = paged_attention_torch(*args, 0.2, sliding_window=window, plan=plan)
        expected = reference.paged_attention_ref(*b.attention_args(), 0.2, sliding_window=window)
        assert_close(out, expected, ATTN_TOL)
    assert all(layout.stale is None for run in plan.decode_runs for layout in run.layouts.values())
