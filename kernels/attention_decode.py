"""Split-KV paged decode attention (one new token per sequence) and its reduce.

Decode is memory bound: each sequence reads its whole context once. With a small batch there
are too few (sequence, KV head) programs to fill the GPU, so each sequence's context is cut
into partitions of PARTITION_SIZE positions, each handled by its own program, which writes an
unnormalised partial output plus its running max and denominator. A second kernel merges the
partitions with log-sum-exp weights (and adds the attention sink, if any, exactly once).
When a single partition covers every sequence, the first kernel writes the final output and
the reduce is skipped.

As in the prefill kernel, all query heads of one KV head share a program (GQA packing) so a
K/V tile is read once per group; the head axis is padded to 16 rows for tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import cdiv, dot_precision, fp8_operand, next_power_of_2
from .attention_prefill import _tanh, check_paged_attention_args
from .fp8_bits import e4m3_to_f32


@triton.jit
def _paged_attention_decode_kernel(
    # pointers
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
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
    num_heads,
    num_partitions,
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
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr,  # 0, or the `_checks.fp8_operand` mode of the cache
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)

    tok = tl.load(cu_seqlens_q_ptr + seq)
    # A sequence with no new token this step owns no output row (cu[seq] is the next one's).
    if tl.load(cu_seqlens_q_ptr + seq + 1) == tok:
        return
    tok = tok.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - sliding_window, 0)
    part_start = part * PARTITION_SIZE
    part_end = tl.minimum(part_start + PARTITION_SIZE, seq_len)
    if SPLIT:
        # Partitions wholly past the sequence or before its window write nothing; the reduce
        # recomputes the same range and skips them. Unsplit, the lone partition always runs so
        # a seq_len-0 padding row still gets a defined (zero) output.
        if part_start >= seq_len or part_end <= kv_lo:
            return

    rows = tl.arange(0, M_PAD)
    head = kv_head * QPK + rows
    row_ok = rows < QPK
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < head_dim
    q_ptrs = q_ptr + tok * stride_q_t + head[:, None] * stride_q_h + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if USE_SINKS and not SPLIT:
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
        m_i = sink * 1.4426950408889634
        l_i = tl.full([M_PAD], 1.0, tl.float32)
    else:
        m_i = tl.full([M_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([M_PAD], tl.float32)
    acc = tl.zeros([M_PAD, HEAD_DIM_PAD], tl.float32)

    loop_start = tl.maximum(part_start, (kv_lo // BLOCK_N) * BLOCK_N)
    qk_scale = scale * 1.4426950408889634
    for start in range(loop_start, part_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = (j < part_end) & (j >= kv_lo)
        phys = tl.load(block_tables_ptr + seq * stride_bt_s + j // BLOCK_SIZE, mask=j_ok, other=0)
        phys = phys.to(tl.int64)
        slot_off = j % BLOCK_SIZE
        k_ptrs = k_cache_ptr + phys[None, :] * stride_k_b + slot_off[None, :] * stride_k_s
        k_ptrs += kv_head * stride_k_h + d[:, None]
        k = tl.load(k_ptrs, mask=j_ok[None, :] & d_ok[:, None], other=0.0)  # [D, BLOCK_N]

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
        qk = tl.where(j_ok[None, :], qk, float("-inf"))

        # Every partition that gets here has >= 1 visible key, but its first tile may not
        # (window start inside the tile), hence the -inf guard.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
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

    if SPLIT:
        # part_acc: [S, Hq, P, HEAD_DIM_PAD] fp32; part_m / part_l: [S, Hq, P] fp32 (log2 domain).
        ml_off = (seq * num_heads + head) * num_partitions + part
        tl.store(part_m_ptr + ml_off, m_i, mask=row_ok)
        tl.store(part_l_ptr + ml_off, l_i, mask=row_ok)
        acc_ptrs = part_acc_ptr + ml_off.to(tl.int64)[:, None] * HEAD_DIM_PAD + d[None, :]
        tl.store(acc_ptrs, acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + tok * stride_o_t + head[:, None] * stride_o_h + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_attention_reduce_kernel(
    # pointers
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    seq_lens_ptr,
    cu_seqlens_q_ptr,
    sinks_ptr,
    # sizes and scalars
    sliding_window,
    head_dim,
    num_heads,
    num_partitions,
    # strides
    stride_o_t,
    stride_o_h,
    # meta
    BLOCK_P: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.load(cu_seqlens_q_ptr + seq)
    if tl.load(cu_seqlens_q_ptr + seq + 1) == tok:
        return
    tok = tok.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - sliding_window, 0)
    first_part = kv_lo // PARTITION_SIZE
    end_part = (seq_len + PARTITION_SIZE - 1) // PARTITION_SIZE
    base = (seq * num_heads + head) * num_partitions

    # Pass 1: global max over the partitions that ran (and the sink).
    m_g = tl.max(tl.full([BLOCK_P], float("-inf"), tl.float32), axis=0)
    if USE_SINKS:
        m_g = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
    for p0 in range(0, num_partitions, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = (p >= first_part) & (p < end_part)
        m_p = tl.load(part_m_ptr + base + p, mask=p_ok, other=float("-inf"))
        m_g = tl.maximum(m_g, tl.max(m_p, axis=0))
    m_g = tl.where(m_g == float("-inf"), 0.0, m_g)  # empty sequence (seq_len 0 padding)

    # Pass 2: rescale each partition to the global max and sum.
    d = tl.arange(0, HEAD_DIM_PAD)
    total = tl.sum(tl.zeros([BLOCK_P], tl.float32), axis=0)
    if USE_SINKS:
        total = tl.exp2(tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634 - m_g)
    acc = tl.zeros([HEAD_DIM_PAD], tl.float32)
    for p0 in range(0, num_partitions, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = (p >= first_part) & (p < end_part)
        m_p = tl.load(part_m_ptr + base + p, mask=p_ok, other=float("-inf"))
        l_p = tl.load(part_l_ptr + base + p, mask=p_ok, other=0.0)
        w = tl.where(p_ok, tl.exp2(m_p - m_g), 0.0)
        total += tl.sum(w * l_p, axis=0)
        a_ptrs = part_acc_ptr + (base + p).to(tl.int64)[:, None] * HEAD_DIM_PAD + d[None, :]
        a = tl.load(a_ptrs, mask=p_ok[:, None], other=0.0)
        acc += tl.sum(w[:, None] * a, axis=0)

    out = acc / tl.where(total == 0.0, 1.0, total)
    o_ptrs = out_ptr + tok * stride_o_t + head * stride_o_h + d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def paged_attention_decode(
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
    max_seq_len: int | None = None,
    partition_size: int = 512,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Paged attention for a batch where every sequence has exactly ONE new token (Triton).

    Arguments are those of `paged_attention_prefill` (same layout; cu_seqlens_q[i] is the row
    of sequence i's token). A sequence with seq_len 0 (CUDA-graph padding) gets zeros; one
    with no query this step (cu_seqlens_q[i + 1] == cu_seqlens_q[i]) is skipped.

    Args:
        q: [T, Hq, D]; key_cache, value_cache: [NB, BS, Hk, D]; block_tables: int32 [S, MB];
            seq_lens: int32 [S]; cu_seqlens_q: int32 [S + 1] with unit steps.
        max_seq_len: host-side bound on seq_lens; fixes the partition count (and so the grid:
            pass max_seq_len_to_capture under CUDA graphs). Computed (one sync) when None.
        partition_size: positions per split-KV program; a power of two >= 16.

    Returns:
        out [T, Hq, D].
    """
    check_paged_attention_args(
        q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, sinks
    )
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with contiguous last dim")
    if num_seqs == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")

    qpk = num_heads // num_kv_heads
    m_pad = max(16, next_power_of_2(qpk))  # tl.dot needs >= 16 rows
    head_dim_pad = max(16, next_power_of_2(head_dim))
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    if block_n is None:
        block_n = 64 if head_dim_pad <= 128 else 32
    # A key tile never straddles two partitions.
    block_n = min(max(16, block_n), partition_size)
    num_partitions = max(1, cdiv(max_seq_len, partition_size))
    split = num_partitions > 1

    if split:
        part_acc = torch.empty(
            num_seqs, num_heads, num_partitions, head_dim_pad, dtype=torch.float32, device=q.device
        )
        part_m = torch.empty(
            num_seqs, num_heads, num_partitions, dtype=torch.float32, device=q.device
        )
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # dummies, never touched when SPLIT=False
    sinks_arg = sinks if sinks is not None else q
    window = int(sliding_window) if sliding_window is not None else 0

    key_cache, kv_mode = fp8_operand(key_cache)
    value_cache, _ = fp8_operand(value_cache)
    _paged_attention_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out, part_acc, part_m, part_l, q, key_cache, value_cache, block_tables, seq_lens,
        cu_seqlens_q, sinks_arg,
        float(scale), float(soft_cap) if soft_cap else 1.0, window,
        float(k_scale), float(v_scale), head_dim, num_heads,
        num_partitions,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        QPK=qpk,
        M_PAD=m_pad,
        BLOCK_N=block_n,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        PARTITION_SIZE=partition_size,
        SPLIT=split,
        USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=bool(soft_cap),
        USE_SINKS=sinks is not None,
        KV_FP8=kv_mode,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )  # fmt: skip
    if not split:
        return out
    _paged_attention_reduce_kernel[(num_seqs, num_heads)](
        out, part_acc, part_m, part_l, seq_lens, cu_seqlens_q, sinks_arg,
        window, head_dim, num_heads, num_partitions,
        out.stride(0), out.stride(1),
        BLOCK_P=min(32, next_power_of_2(num_partitions)),
        HEAD_DIM_PAD=head_dim_pad,
        PARTITION_SIZE=partition_size,
        USE_WINDOW=sliding_window is not None,
        USE_SINKS=sinks is not None,
        num_warps=4,
    )  # fmt: skip
    return out
