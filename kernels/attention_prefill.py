"""Varlen paged attention (prefill, chunked prefill with a cached prefix, mixed batches).

One program owns BLOCK_Q query tokens of one sequence and ALL the query heads that share one
KV head (GQA packing: the M axis of the tile is token x head-in-group), so each K/V tile read
from the cache serves the whole group. Keys are walked in tiles of BLOCK_N positions; each
position is translated to (physical block, offset) through the block table, so BLOCK_N does
not have to match the cache block size and padding entries past the sequence are never read.
Softmax is the online (flash) form in base 2 with fp32 accumulators.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    FP8_KV_DTYPES,
    cdiv,
    check_float,
    check_int,
    check_kv_cache,
    check_same_device,
    dot_precision,
    fp8_operand,
    next_power_of_2,
)
from .fp8_bits import e4m3_to_f32

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    # tl has no tanh; this form saturates cleanly to +-1 for large |x| (exp2 -> inf or 0).
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _paged_attention_prefill_kernel(
    # pointers
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    cu_seqlens_q_ptr,
    sinks_ptr,
    # sizes and scalars
    scale,
    soft_cap,
    sliding_window,
    k_scale,
    v_scale,
    head_dim,
    # strides (elements; the head-dim stride is 1)
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_k_b,
    stride_k_s,
    stride_k_h,
    stride_v_b,
    stride_v_s,
    stride_v_h,
    stride_bt_s,
    # meta
    QPK: tl.constexpr,
    QPK_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr,  # 0, or the `_checks.fp8_operand` mode of the cache
    DOT_PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * QPK_PAD
    q_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // QPK_PAD  # token index within the sequence's queries
    head_in_group = rows % QPK_PAD
    head = kv_head * QPK + head_in_group
    row_ok = (tok < query_len) & (head_in_group < QPK)
    pos = context_len + tok  # absolute position of each query row

    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < head_dim
    q_ptrs = q_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_q_t
    q_ptrs += head[:, None] * stride_q_h + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if USE_SINKS:
        # A sink is a logit with no value: seeding the running max/denominator with it is
        # exactly "one more column in the softmax".
        sink = tl.load(sinks_ptr + head, mask=head_in_group < QPK, other=0.0).to(tl.float32)
        m_i = sink * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # Keys this tile can see: up to the last query row's position (causal), and from the first
    # query row's window start (sliding window), aligned down to BLOCK_N.
    last_tok = tl.minimum((q_block + 1) * BLOCK_Q, query_len) - 1
    kv_end = context_len + last_tok + 1
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(context_len + q_block * BLOCK_Q - sliding_window + 1, 0)
        kv_start = (kv_start // BLOCK_N) * BLOCK_N

    qk_scale = scale * 1.4426950408889634
    for start in range(kv_start, kv_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < kv_end
        # NOTE: the block table is only read for j < kv_end <= seq_len, so padding entries
        # (0, -1, stale ids) are never dereferenced.
        phys = tl.load(block_tables_ptr + seq * stride_bt_s + j // BLOCK_SIZE, mask=j_ok, other=0)
        phys = phys.to(tl.int64)
        slot_off = j % BLOCK_SIZE
        kv_mask = j_ok[None, :] & d_ok[:, None]
        k_ptrs = k_cache_ptr + phys[None, :] * stride_k_b + slot_off[None, :] * stride_k_s
        k_ptrs += kv_head * stride_k_h + d[:, None]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [HEAD_DIM_PAD, BLOCK_N]

        if KV_FP8 == 2:  # e4m3 bytes (no e4m3 type below sm_89): decode them
            k = e4m3_to_f32(k).to(q.dtype)
        elif KV_FP8:  # an FP8 cache: widen the tile, the layer's scale multiplies q.k
            k = k.to(q.dtype)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if KV_FP8:
            qk = qk * k_scale
        if USE_SOFTCAP:
            qk = soft_cap * _tanh(qk * (scale / soft_cap)) * 1.4426950408889634
        else:
            qk = qk * qk_scale
        visible = j_ok[None, :] & (j[None, :] <= pos[:, None])
        if USE_WINDOW:
            visible &= j[None, :] > pos[:, None] - sliding_window
        qk = tl.where(visible, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        # Rows with nothing visible yet keep m = -inf; shift by 0 so exp2 sees -inf, not nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_ptrs = v_cache_ptr + phys[:, None] * stride_v_b + slot_off[:, None] * stride_v_s
        v_ptrs += kv_head * stride_v_h + d[None, :]
        v = tl.load(v_ptrs, mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, D]
        if KV_FP8 == 2:
            v = e4m3_to_f32(v).to(q.dtype)
        elif KV_FP8:
            v = v.to(q.dtype)
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if KV_FP8:
            pv = pv * v_scale
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + (q_start + tok).to(tl.int64)[:, None] * stride_o_t
    o_ptrs += head[:, None] * stride_o_h + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def check_paged_attention_args(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    sinks: torch.Tensor | None,
) -> None:
    """Shape/dtype/stride checks shared by the prefill and decode launchers."""
    check_float("q", q, 3)
    check_kv_cache("key_cache", key_cache, 4)
    check_kv_cache("value_cache", value_cache, 4)
    check_int("block_tables", block_tables, 2, (torch.int32,))
    check_int("seq_lens", seq_lens, 1, (torch.int32,))
    check_int("cu_seqlens_q", cu_seqlens_q, 1, (torch.int32,))
    check_same_device(
        q=q, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
        seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q, sinks=sinks,
    )  # fmt: skip
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key/value cache shapes differ: {key_cache.shape} vs {value_cache.shape}")
    if key_cache.dtype != value_cache.dtype or (
        key_cache.dtype != q.dtype and key_cache.dtype not in FP8_KV_DTYPES
    ):
        raise ValueError(
            f"q/cache dtypes differ: {q.dtype}, {key_cache.dtype}, {value_cache.dtype}"
        )
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim mismatch: q {head_dim} vs cache {key_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs or cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(
            f"batch mismatch: block_tables {tuple(block_tables.shape)}, seq_lens {num_seqs}, "
            f"cu_seqlens_q {tuple(cu_seqlens_q.shape)}"
        )
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be row-contiguous, strides {block_tables.stride()}")
    block_size = key_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if sinks is not None and (sinks.shape != (num_heads,) or sinks.dtype != torch.float32):
        raise ValueError(f"sinks must be float32 [{num_heads}], got {sinks.dtype} {sinks.shape}")


def paged_attention_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal varlen attention of new tokens against a paged KV cache (Triton).

    Handles any mix of query lengths, including 1 (decode rows) and cached prefixes
    (seq_len > query_len); the new tokens of sequence i sit at positions
    seq_lens[i] - query_len .. seq_lens[i] - 1 and must already be written to the cache.

    Args:
        q: [T, Hq, D] fp32/fp16/bf16, head dim contiguous.
        key_cache, value_cache: [NB, BS, Hk, D], same dtype as q (or FP8, read as
            cache * k_scale / v_scale), BS a power of two.
        block_tables: int32 [S, MB]; entries past ceil(seq_len / BS) are never read.
        seq_lens: int32 [S].
        cu_seqlens_q: int32 [S + 1], cu_seqlens_q[0] == 0.
        scale: softmax scale applied to q·k.
        sliding_window: keys in (p - window, p] only.
        soft_cap: logits -> soft_cap * tanh(logits / soft_cap).
        sinks: float32 [Hq] attention-sink logits.
        max_query_len: host-side max of query lengths; computed (one sync) when None.
        out: optional [T, Hq, D] output buffer.
        block_q, block_n: tile overrides (tests use them to force multi-tile paths).
        k_scale, v_scale: an FP8 cache's per-tensor scales (ignored otherwise).

    Returns:
        out [T, Hq, D]; rows past cu_seqlens_q[-1] are left unwritten.
    """
    check_paged_attention_args(
        q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, sinks
    )
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with contiguous last dim")
    if num_seqs == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")

    qpk = num_heads // num_kv_heads
    qpk_pad = next_power_of_2(qpk)
    head_dim_pad = max(16, next_power_of_2(head_dim))
    # M = BLOCK_Q * QPK_PAD rows per program; tl.dot needs M >= 16. ~64 rows balances register
    # pressure against K/V reuse; large head dims halve the key tile for the same reason.
    if block_q is None:
        block_q = max(1, 64 // qpk_pad)
    block_q = max(block_q, cdiv(16, qpk_pad))
    if block_n is None:
        block_n = 64 if head_dim_pad <= 128 else 32
    block_n = max(16, block_n)

    grid = (cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    key_cache, kv_mode = fp8_operand(key_cache)
    value_cache, _ = fp8_operand(value_cache)
    _paged_attention_prefill_kernel[grid](
        out, q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q,
        sinks if sinks is not None else q,  # dummy pointer, never read when USE_SINKS=False
        float(scale),
        float(soft_cap) if soft_cap else 1.0,
        int(sliding_window) if sliding_window is not None else 0,
        float(k_scale), float(v_scale),
        head_dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        QPK=qpk,
        QPK_PAD=qpk_pad,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=bool(soft_cap),
        USE_SINKS=sinks is not None,
        KV_FP8=kv_mode,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4 if head_dim_pad <= 128 else 8,
    )  # fmt: skip
    return out
