"""Paged attention: reference vs naive dense attention, Triton prefill/decode vs reference."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.kernels.attention_decode import paged_attention_decode
from splitserve.kernels.attention_prefill import paged_attention_prefill
from splitserve.kernels.reference import paged_attention_ref

from .kernel_test_utils import (
    ATTN_TOL,
    DEVICE,
    DTYPES,
    assert_close,
    make_paged_batch,
    requires_compiled_gpu,
)

HEAD_DIMS = [64, 80, 96, 128, 256]
# (num_heads, num_kv_heads): MHA, GQA with a non-power-of-two group, MQA.
HEAD_CONFIGS = [(4, 4), (6, 2), (4, 1)]
# (query_len, context_len): a chunk with a cached prefix, another one sharing its first two
# blocks, a decode row, a fresh prompt longer than one query tile, a one-token prompt.
PREFILL_SPECS = [(3, 13), (6, 9), (1, 40), (20, 0), (1, 0)]
# Decode rows: shared prefix, a context spanning several partitions, a first decode step.
DECODE_SPECS = [(1, 8), (1, 9), (1, 40), (1, 0), (1, 3)]
BLOCK_SIZE = 4

FEATURES = {
    "plain": {},
    "window3": {"sliding_window": 3},
    "window8": {"sliding_window": 8},
    "softcap": {"soft_cap": 2.0},
    "sinks": {"sinks": True},
    "all": {"sliding_window": 5, "soft_cap": 2.0, "sinks": True},
}


def _features(name: str, num_heads: int) -> dict:
    kw = dict(FEATURES[name])
    if kw.get("sinks"):
        kw["sinks"] = torch.randn(num_heads, dtype=torch.float32, device=DEVICE) * 2
    return kw


def _batch(specs, heads, head_dim, dtype, **kw):
    num_heads, num_kv_heads = heads
    kw.setdefault("shared_prefix_blocks", 2)
    return make_paged_batch(
        specs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=BLOCK_SIZE, dtype=dtype, q_scale=2.0, **kw,
    )  # fmt: skip


def naive_dense_attention(q, k, v, scale, sliding_window=None, soft_cap=None, sinks=None):
    """Textbook attention for ONE sequence from explicit K/V, loops over heads and queries.

    q: [Q, Hq, D] (the last Q positions of a K-long sequence); k, v: [K, Hk, D] -> [Q, Hq, D].
    """
    num_q, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(num_q, num_heads, v.shape[-1], dtype=torch.float64)
    for h in range(num_heads):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        for t in range(num_q):
            p = seq_len - num_q + t
            lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
            logits = (kh[lo : p + 1] @ q[t, h].double()) * scale
            if soft_cap:
                logits = soft_cap * torch.tanh(logits / soft_cap)
            peak = logits.max().item()
            if sinks is not None:
                peak = max(peak, float(sinks[h]))
            w = torch.exp(logits - peak)
            denom = w.sum() + (math.exp(float(sinks[h]) - peak) if sinks is not None else 0.0)
            out[t, h] = (w[:, None] * vh[lo : p + 1]).sum(0) / denom
    return out


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("heads", HEAD_CONFIGS)
def test_reference_matches_naive_dense(heads, feature):
    """The paged reference against per-sequence dense attention: checks the oracle itself."""
    b = _batch(PREFILL_SPECS, heads, 80, torch.float32)
    kw = _features(feature, heads[0])
    scale = 80**-0.5
    out = paged_attention_ref(*b.attention_args(), scale, **kw)
    assert not out.isnan().any()
    cu = b.cu_seqlens_q.tolist()
    for i in range(len(b.query_lens)):
        expected = naive_dense_attention(
            b.q[cu[i] : cu[i + 1]].cpu(), b.keys[i], b.values[i], scale,
            kw.get("sliding_window"), kw.get("soft_cap"), kw.get("sinks"),
        )  # fmt: skip
        assert_close(out[cu[i] : cu[i + 1]].cpu(), expected.float(), ATTN_TOL)


def test_reference_is_causal():
    """Guard against a vacuous oracle: attention without the causal mask must differ."""
    b = _batch([(6, 3)], (4, 4), 64, torch.float32, shared_prefix_blocks=0)
    out = paged_attention_ref(*b.attention_args(), 0.125).cpu().double()
    logits = torch.einsum("qhd,khd->hqk", b.q.cpu().double(), b.keys[0].double()) * 0.125
    acausal = torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), b.values[0].double())
    assert (acausal - out).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_prefill_kernel_head_dims(head_dim, dtype):
    heads = HEAD_CONFIGS[HEAD_DIMS.index(head_dim) % len(HEAD_CONFIGS)]
    b = _batch(PREFILL_SPECS, heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = paged_attention_prefill(*b.attention_args(), scale, block_n=16)
    assert_close(out, paged_attention_ref(*b.attention_args(), scale), ATTN_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("heads", HEAD_CONFIGS)
def test_prefill_kernel_features(heads, feature, dtype):
    b = _batch(PREFILL_SPECS, heads, 64, dtype, pad_value=0)
    kw = _features(feature, heads[0])
    out = paged_attention_prefill(*b.attention_args(), 0.125, block_n=16, **kw)
    assert_close(out, paged_attention_ref(*b.attention_args(), 0.125, **kw), ATTN_TOL)


def test_prefill_kernel_default_tiles_and_out_buffer():
    """Launcher-chosen tiles (not the small test ones) and a caller-provided output buffer."""
    b = _batch(PREFILL_SPECS, (8, 2), 128, torch.float16)
    out = torch.full_like(b.q, float("nan"))
    res = paged_attention_prefill(*b.attention_args(), 0.1, max_query_len=b.max_query_len, out=out)
    assert res is out
    assert_close(out, paged_attention_ref(*b.attention_args(), 0.1), ATTN_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_kernel_head_dims(head_dim, dtype):
    heads = HEAD_CONFIGS[HEAD_DIMS.index(head_dim) % len(HEAD_CONFIGS)]
    b = _batch(DECODE_SPECS, heads, head_dim, dtype)
    scale = head_dim**-0.5
    # 41 positions over partitions of 16: the split-KV + reduce path.
    out = paged_attention_decode(*b.attention_args(), scale, partition_size=16, block_n=16)
    assert_close(out, paged_attention_ref(*b.attention_args(), scale), ATTN_TOL)


@pytest.mark.parametrize("partition_size", [16, 64], ids=["split", "single"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("heads", HEAD_CONFIGS)
def test_decode_kernel_features(heads, feature, dtype, partition_size):
    b = _batch(DECODE_SPECS, heads, 64, dtype)
    kw = _features(feature, heads[0])
    out = paged_attention_decode(
        *b.attention_args(), 0.125, partition_size=partition_size, block_n=16, **kw
    )
    assert_close(out, paged_attention_ref(*b.attention_args(), 0.125, **kw), ATTN_TOL)


@pytest.mark.parametrize("partition_size", [16, 64], ids=["split", "single"])
def test_decode_kernel_padding_rows(partition_size):
    """seq_len 0 rows (CUDA-graph padding) come out as zeros, neighbours unaffected."""
    b = _batch(DECODE_SPECS, (4, 2), 64, torch.float32)
    b.seq_lens[3] = 0
    out = paged_attention_decode(*b.attention_args(), 0.125, partition_size=partition_size)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    assert_close(out, paged_attention_ref(*b.attention_args(), 0.125), ATTN_TOL)


def test_decode_kernel_skips_sequences_without_query():
    """A sequence with no new token must not write into its neighbour's row."""
    b = _batch([(1, 8), (0, 12), (1, 40), (1, 3)], (4, 2), 64, torch.float32)
    for partition_size in (16, 64):
        out = paged_attention_decode(*b.attention_args(), 0.125, partition_size=partition_size)
        assert_close(out, paged_attention_ref(*b.attention_args(), 0.125), ATTN_TOL)


def test_kernels_reject_bad_arguments():
    b = _batch(PREFILL_SPECS, (4, 2), 64, torch.float32)
    args = list(b.attention_args())
    with pytest.raises(ValueError, match="dtype"):
        paged_attention_prefill(args[0], args[1], args[2], args[3].long(), *args[4:], 0.1)
    with pytest.raises(ValueError, match="num_kv_heads"):
        paged_attention_prefill(args[0][:, :3], *args[1:], 0.1)
    with pytest.raises(ValueError, match="sinks"):
        paged_attention_decode(*args, 0.1, sinks=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="dtypes differ"):
        paged_attention_decode(args[0].half(), *args[1:], 0.1)


def test_kernel_fails_on_wrong_block_table():
    """Pointing one table entry at another sequence's block must show in the comparison
    (decode attention is order-blind, so a swap within a sequence would not)."""
    b = _batch(DECODE_SPECS, (4, 2), 64, torch.float32, poison=False)
    good = paged_attention_ref(*b.attention_args(), 0.125)
    b.block_tables[2, 0] = b.block_tables[0, 2]
    bad = paged_attention_decode(*b.attention_args(), 0.125, partition_size=16)
    assert (bad[2] - good[2]).abs().max() > 1e-3


@requires_compiled_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_bf16_prefill_and_decode_on_gpu(head_dim):
    for specs, fn in (
        (PREFILL_SPECS, paged_attention_prefill),
        (DECODE_SPECS, paged_attention_decode),
    ):
        b = _batch(specs, (8, 2), head_dim, torch.bfloat16)
        kw = _features("all", 8)
        out = fn(*b.attention_args(), head_dim**-0.5, **kw)
        assert_close(out, paged_attention_ref(*b.attention_args(), head_dim**-0.5, **kw), ATTN_TOL)
