"""The CPU decode path that reads the paged cache in place (`torch_paged_decode`), against the
reference: ragged batches, odd block counts, sliding windows, GQA/MQA, soft-capping, sinks,
stale (NaN) slots, and the guarantee that it gathers no blocks and builds its indices once
per step."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from splitserve.kernels import reference, torch_attention, torch_paged_decode
from splitserve.kernels.torch_attention import (
    TorchAttentionPlan,
    paged_attention_torch,
    write_kv_cache_torch,
)
from splitserve.kernels.torch_paged_decode import new_kv_cache, supports

from .kernel_test_utils import ATTN_TOL, assert_close, make_paged_batch

# Decodes of ragged lengths (odd block counts, one-token contexts, exact block multiples),
# out of order, around two prefills (one with a cached prefix).
RAGGED = [(1, 90), (1, 0), (5, 0), (1, 63), (1, 7), (3, 20), (1, 95), (1, 2), (1, 31)]
HEADS = [(4, 4), (6, 2), (8, 1)]  # MHA, GQA, MQA


def _paged_batch(specs, heads, block_size=4, head_dim=32, **kw):
    """A paged batch whose caches are in the in-place layout (same contents, NaN where no
    token lives)."""
    b = make_paged_batch(
        specs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
        block_size=block_size, dtype=torch.float32, **kw,
    )  # fmt: skip
    key_cache, value_cache = new_kv_cache(
        b.key_cache.shape[0], block_size, heads[1], head_dim, torch.float32, "cpu"
    )
    key_cache.copy_(b.key_cache)
    value_cache.copy_(b.value_cache)
    return b, key_cache, value_cache


def _args(b, key_cache, value_cache):
    return (b.q, key_cache, value_cache, b.block_tables, b.seq_lens, b.cu_seqlens_q)


def test_new_kv_cache_layout():
    """Keys are stored [NB, Hk, D, BS] under the usual [NB, BS, Hk, D] shape; values are
    plain. Other dtypes and devices get plain caches (the gather path)."""
    key, value = new_kv_cache(5, 4, 2, 8, torch.float32, "cpu")
    assert key.shape == value.shape == (5, 4, 2, 8)
    assert key.permute(0, 2, 3, 1).is_contiguous() and not key.is_contiguous()
    assert value.is_contiguous() and not key.any() and not value.any()
    assert supports(key, value)
    plain = new_kv_cache(5, 4, 2, 8, torch.bfloat16, "cpu")
    assert all(t.is_contiguous() for t in plain) and not supports(*plain)
    assert not supports(torch.zeros(5, 4, 2, 8), torch.zeros(5, 4, 2, 8))
    assert not supports(None, None)


@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("window", [None, 1, 5, 17])
@pytest.mark.parametrize("feature", ["plain", "soft_cap", "sinks"])
def test_matches_reference(heads, window, feature):
    torch.manual_seed(0)
    b, key_cache, value_cache = _paged_batch(RAGGED, heads)
    extra = {
        "plain": {},
        "soft_cap": {"soft_cap": 4.0},
        "sinks": {"sinks": torch.randn(heads[0])},
    }[feature]
    out = paged_attention_torch(
        *_args(b, key_cache, value_cache), 0.3, sliding_window=window, **extra
    )
    expected = reference.paged_attention_ref(
        *b.attention_args(), 0.3, sliding_window=window, **extra
    )
    assert_close(out, expected, ATTN_TOL)


@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_ragged_decodes(block_size, seed):
    """Random decode batches: every context length mod the block size, head_dim 64."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    specs = [(1, rng.randrange(0, 5 * block_size + 3)) for _ in range(rng.randrange(1, 12))]
    heads = rng.choice(HEADS)
    b, key_cache, value_cache = _paged_batch(specs, heads, block_size=block_size, head_dim=64)
    window = rng.choice([None, rng.randrange(1, 3 * block_size + 2)])
    out = paged_attention_torch(*_args(b, key_cache, value_cache), 0.125, sliding_window=window)
    expected = reference.paged_attention_ref(*b.attention_args(), 0.125, sliding_window=window)
    assert_close(out, expected, ATTN_TOL)


def test_shared_prefix_blocks():
    """Two rows reading the same physical blocks (a prefix-cache hit)."""
    torch.manual_seed(0)
    b, key_cache, value_cache = _paged_batch(
        [(1, 20), (1, 13), (1, 5)], (6, 2), shared_prefix_blocks=3
    )
    out = paged_attention_torch(*_args(b, key_cache, value_cache), 0.3)
    assert_close(out, reference.paged_attention_ref(*b.attention_args(), 0.3), ATTN_TOL)


def test_reads_in_place_and_builds_indices_once_per_step(monkeypatch):
    """Layers sharing a plan gather no blocks (the workspace stays empty) and build the index
    tensors once per window, not once per layer."""
    torch.manual_seed(0)
    b, key_cache, value_cache = _paged_batch([s for s in RAGGED if s[0] == 1], (6, 2))
    builds = []
    build = torch_paged_decode.build_layout
    monkeypatch.setattr(
        torch_paged_decode, "build_layout", lambda *a, **k: builds.append(a[4]) or build(*a, **k)
    )
    plan = TorchAttentionPlan(b.seq_lens, b.cu_seqlens_q, b.block_tables, 4, clean_tails=True)
    for window in (None, 5, None, 5, None):
        out = paged_attention_torch(
            *_args(b, key_cache, value_cache), 0.2, sliding_window=window, plan=plan
        )
        expected = reference.paged_attention_ref(*b.attention_args(), 0.2, sliding_window=window)
        assert_close(out, expected, ATTN_TOL)
    assert builds == [None, 5]
    assert not plan.workspace._buffers  # the gather path would have filled "k" and "v"
    assert all(not run.layouts for run in plan.decode_runs)


def test_plain_caches_take_the_gather_path():
    """Contiguous caches (other backends' layout) still work, through the gather path."""
    torch.manual_seed(0)
    b = make_paged_batch(
        RAGGED, num_heads=6, num_kv_heads=2, head_dim=32, block_size=4, dtype=torch.float32
    )
    plan = TorchAttentionPlan(b.seq_lens, b.cu_seqlens_q, b.block_tables, 4)
    out = paged_attention_torch(*b.attention_args(), 0.2, plan=plan)
    assert_close(out, reference.paged_attention_ref(*b.attention_args(), 0.2), ATTN_TOL)
    assert not plan._paged and plan.workspace._buffers


def test_written_through_the_torch_path_after_nan():
    """The worker's mode: the cache starts as NaN and every token goes through
    `write_kv_cache_torch` into the in-place layout; decodes and prefills read it back."""
    torch.manual_seed(0)
    b, key_cache, value_cache = _paged_batch(RAGGED, (6, 2))
    key_cache.fill_(float("nan"))
    value_cache.fill_(float("nan"))
    for i, (k, v) in enumerate(zip(b.keys, b.values, strict=True)):
        pos = torch.arange(k.shape[0])
        slots = b.block_tables[i, pos // 4].long() * 4 + pos % 4
        for start in range(0, k.shape[0], 3):
            part = slice(start, start + 3)
            write_kv_cache_torch(k[part], v[part], key_cache, value_cache, slots[part])
    assert supports(key_cache, value_cache)
    plan = TorchAttentionPlan(b.seq_lens, b.cu_seqlens_q, b.block_tables, 4, clean_tails=True)
    for window in (None, 6):
        out = paged_attention_torch(
            *_args(b, key_cache, value_cache), 0.2, sliding_window=window, plan=plan
        )
        expected = reference.paged_attention_ref(*b.attention_args(), 0.2, sliding_window=window)
        assert_close(out, expected, ATTN_TOL)


def test_layout_indices():
    """The index tensors of a two-row batch, spelled out: one row of 5 tokens (2 blocks of
    4), one of 3 (1 block); MHA with 2 heads of size 2."""
    tables = np.array([[7, 2], [4, 0]])
    layout = torch_paged_decode.build_layout(
        slice(0, 2), np.array([5, 3]), tables, 4, None, 2, 2, 2, torch.device("cpu")
    )
    assert layout.width == 2
    # Bags (row, head, block): row 0 reads blocks 7, 2; row 1 reads block 4, then an empty bag.
    assert layout.key_offsets.tolist() == [0, 2, 4, 6, 8, 10, 10, 12, 12]
    # Key table rows (block * Hk + head) * D + d.
    assert layout.key_index.tolist() == [28, 29, 8, 9, 30, 31, 10, 11, 16, 17, 18, 19]
    assert layout.key_query.tolist() == [0, 0, 1, 1, 2, 3]
    assert layout.visible[:, 0].int().tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    # Value bags (row, head) hold the visible slots; table rows slot * Hk + head.
    assert layout.value_offsets.tolist() == [0, 5, 10, 13, 16]
    slots0, slots1 = [28, 29, 30, 31, 8], [16, 17, 18]
    assert layout.value_index.tolist() == (
        [s * 2 for s in slots0] + [s * 2 + 1 for s in slots0]
        + [s * 2 for s in slots1] + [s * 2 + 1 for s in slots1]
    )  # fmt: skip
    assert layout.value_weights.tolist() == (
        [0, 1, 2, 3, 4] + [8, 9, 10, 11, 12] + [16, 17, 18] + [24, 25, 26]
    )


@pytest.mark.parametrize("num_tokens", [1, 7, torch_attention._FLAT_WRITE_MAX_TOKENS + 3])
def test_write_into_the_in_place_layout_matches_the_reference(num_tokens):
    """Both write routes into slot-last keys (one flat index_copy_ for few tokens, indexed
    assignment for many) give the reference's cache; fresh blocks are cleared of leftovers
    (NaN here), blocks already started keep theirs."""
    torch.manual_seed(num_tokens)
    num_blocks, bs, hk, d = 64, 8, 2, 16
    key_cache, value_cache = new_kv_cache(num_blocks, bs, hk, d, torch.float32, "cpu")
    key_cache.fill_(float("nan"))
    value_cache.fill_(float("nan"))
    others = torch.randperm(num_blocks * bs)
    others = others[others != 5 * bs]
    slots = torch.cat([torch.tensor([5 * bs]), others[: num_tokens - 1]])  # one fresh block
    key, value = torch.randn(num_tokens, hk, d), torch.randn(num_tokens, hk, d)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    fresh = slots[slots % bs == 0] // bs
    expected_k[fresh], expected_v[fresh] = 0.0, 0.0
    reference.write_kv_cache_ref(key, value, expected_k, expected_v, slots)
    write_kv_cache_torch(key, value, key_cache, value_cache, slots)
    assert supports(key_cache, value_cache)
    assert torch.equal(key_cache.nan_to_num(7.0), expected_k.nan_to_num(7.0))
    assert torch.equal(value_cache.nan_to_num(7.0), expected_v.nan_to_num(7.0))
