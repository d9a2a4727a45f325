"""The torch paged-attention backend against dense attention over each sequence's full context."""

from __future__ import annotations

import math
import os

import pytest
import torch

from splitserve.kernels import torch_paged_decode
from splitserve.worker.attention import (
    PAGED_DECODE_ENV,
    Attention,
    AttentionMetadata,
    forward_context,
    get_attention_backend,
)

HQ, HK, D, BS, NB = 6, 2, 8, 4, 128


def _dense(q, keys, values, q_start, window):
    """q [n, HQ, D] at positions q_start.., keys/values [L, HK, D] -> [n, HQ * D]."""
    n, length = q.shape[0], keys.shape[0]
    k = keys.repeat_interleave(HQ // HK, dim=1).transpose(0, 1)
    v = values.repeat_interleave(HQ // HK, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(D)
    qpos = torch.arange(q_start, q_start + n)[:, None]
    kpos = torch.arange(length)[None, :]
    visible = kpos <= qpos
    if window is not None:
        visible &= kpos > qpos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, HQ * D)


# (cached tokens, new tokens) per sequence, decodes (one new token) first
MIXED = [(9, 1), (0, 1), (15, 1), (8, 7), (0, 11), (0, 3)]
"""Three decodes, then a prefill with a cached prefix, a fresh prefill, a one-block prefill."""
SPREAD = [(2, 1), (6, 1), (7, 1), (60, 1), (88, 1), (95, 1), (4, 9)]
"""Decodes of very different lengths (sorted, as the runner sends them): several groups."""


def _batch(seqs, window, d=D):
    """A step over `seqs` with random caches: (layer, meta, q, k, v, contexts, slots)."""
    torch.manual_seed(0)
    layer = Attention(HQ, HK, d, d**-0.5, layer_idx=0, sliding_window=window)
    key_cache, value_cache = torch.randn(NB, BS, HK, d), torch.randn(NB, BS, HK, d)
    layer.kv_cache = (key_cache, value_cache)
    perm = torch.randperm(NB).tolist()
    tables, contexts, q_all, k_all, v_all, slots = [], [], [], [], [], []
    for cached, new in seqs:
        total = cached + new
        table = [perm.pop() for _ in range(math.ceil(total / BS))]
        tables.append(table)
        keys, values = torch.randn(total, HK, d), torch.randn(total, HK, d)
        for p in range(cached):  # the prefix already sits in the cache
            key_cache[table[p // BS], p % BS] = keys[p]
            value_cache[table[p // BS], p % BS] = values[p]
        contexts.append((keys, values))
        q_all.append(torch.randn(new, HQ, d))
        k_all.append(keys[cached:])
        v_all.append(values[cached:])
        slots += [table[p // BS] * BS + p % BS for p in range(cached, total)]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32)
    query_lens = torch.tensor([n for _, n in seqs])
    meta = AttentionMetadata(
        num_tokens=len(slots),
        slot_mapping=torch.tensor(slots),
        seq_lens=seq_lens,
        query_start_loc=torch.cat([torch.zeros(1), query_lens.cumsum(0)]).to(torch.int32),
        block_tables=padded,
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
    )
    q, k, v = torch.cat(q_all), torch.cat(k_all), torch.cat(v_all)
    return layer, meta, q, k, v, contexts, q_all, slots


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("seqs", [MIXED, SPREAD], ids=["mixed", "spread"])
def test_batch_matches_dense_attention(seqs, window):
    layer, meta, q, k, v, contexts, q_all, slots = _batch(seqs, window)
    with forward_context(get_attention_backend("torch", torch.device("cpu")), meta):
        out = layer(q, k, v)
    start = 0
    for (cached, new), (keys, values), qi in zip(seqs, contexts, q_all, strict=True):
        expected = _dense(qi, keys, values, cached, window)
        torch.testing.assert_close(out[start : start + new], expected, atol=1e-5, rtol=1e-5)
        start += new
    # decodes are batched, in several runs only when their lengths differ a lot
    plan = meta.extras["torch_plan"]
    assert plan.num_decodes == sum(n == 1 for _, n in seqs)
    assert (len(plan.decode_runs) > 1) == (seqs is SPREAD)
    # the new keys landed in their slots
    flat = layer.kv_cache[0].view(-1, HK, D)
    torch.testing.assert_close(flat[torch.tensor(slots)], k)


@pytest.mark.parametrize("paged", ["1", "0"])
def test_torch_backend_cache_layout(monkeypatch, paged):
    """The torch backend allocates keys in the layout its decodes read in place; with
    SPLITSERVE_CPU_PAGED_DECODE=0, plain caches and the gather path. Same results."""
    monkeypatch.setenv(PAGED_DECODE_ENV, paged)
    backend = get_attention_backend("torch", torch.device("cpu"))
    key, value = backend.new_kv_cache((NB, BS, HK, D), torch.float32, torch.device("cpu"))
    assert torch_paged_decode.supports(key, value) == (paged == "1")
    layer, meta, q, k, v, contexts, q_all, _ = _batch(MIXED, 5)
    key.copy_(layer.kv_cache[0])
    value.copy_(layer.kv_cache[1])
    layer.kv_cache = (key, value)
    with forward_context(backend, meta):
        out = layer(q, k, v)
    start = 0
    for (cached, new), (keys, values), qi in zip(MIXED, contexts, q_all, strict=True):
        expected = _dense(qi, keys, values, cached, 5)
        torch.testing.assert_close(out[start : start + new], expected, atol=1e-5, rtol=1e-5)
        start += new
    plan = meta.extras["torch_plan"]
    assert bool(plan._paged) == (paged == "1")
    assert all(bool(run.layouts) == (paged == "0") for run in plan.decode_runs)


@pytest.mark.parametrize("seqs", [MIXED, [(9, 1), (0, 1), (15, 1)]], ids=["mixed", "decodes"])
def test_triton_backend_matches_torch(seqs):
    """The kernels seam: same step through splitserve.kernels (interpreted on CPU)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    d = 16  # the kernels want a power-of-two head size of at least 16
    layer, meta, q, k, v, _, _, slots = _batch(seqs, None, d)
    torch_layer, torch_meta, *_ = _batch(seqs, None, d)
    with forward_context(get_attention_backend("triton", torch.device("cpu")), meta):
        out = layer(q, k, v)
    with forward_context(get_attention_backend("torch", torch.device("cpu")), torch_meta):
        expected = torch_layer(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # the same keys landed in the same slots (the torch path also clears the rest of a block
    # whose first token it writes: slots no token owns yet)
    for cache, torch_cache in zip(layer.kv_cache, torch_layer.kv_cache, strict=True):
        flat, torch_flat = cache.view(-1, HK, d), torch_cache.view(-1, HK, d)
        torch.testing.assert_close(flat[torch.tensor(slots)], torch_flat[torch.tensor(slots)])


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert get_attention_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        get_attention_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="'nope'.*torch"):
        get_attention_backend("nope", torch.device("cpu"))


def test_attention_outside_a_step_fails_clearly():
    layer = Attention(2, 1, 4, 0.5, layer_idx=0)
    with pytest.raises(RuntimeError, match="forward_context"):
        layer(torch.zeros(1, 2, 4), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
