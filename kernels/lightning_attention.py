"""Lightning attention (linear attention with a fixed per-head decay) over packed
variable-length sequences, and its one-step decode update batched over state slots.

`lightning_prefill`: one program per (sequence, head, value block) walks its sequence in
blocks of BLOCK_T tokens, carrying the state [BLOCK_D, BLOCK_V] (k^T v, decayed) in registers:
per block, the intra-block product (q k^T masked causally and weighted by exp(-s (i - j))) @ v,
the carried state's part exp(-s (i + 1)) q @ state, then the state at the block's end,
exp(-s n) state + (k exp(-s (n - 1 - j)))^T v for a block of n tokens. Any BLOCK_T gives the
same function. Sequences start from their slot's state (has_initial_state) or zeros; the final
state is written back to the slot.

`lightning_decode`: one token per sequence; one program per (sequence, head, value block)
reads its slot's state, applies exp(-s) state + k^T v, writes it back and returns q @ state.

Shapes: q, k [T, H, D], v [T, H, Dv], slope [H] (s > 0), kv_states [slots, H, D, Dv]. fp32
accumulation. Reference: `torch_lightning.lightning_prefill` / `lightning_decode`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import next_power_of_2


@triton.jit
def _lightning_prefill_kernel(
    # pointers
    o_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    slope_ptr,
    state_ptr,
    cu_ptr,
    slot_ptr,
    init_ptr,
    # sizes
    head_dim,
    value_dim,
    # strides
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_o_t,
    stride_o_h,
    stride_s_slot,
    stride_s_h,
    stride_s_d,
    # meta
    HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    es = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    ds = tl.arange(0, BLOCK_D)
    ts = tl.arange(0, BLOCK_T)
    dmask = ds < head_dim
    emask = es < value_dim
    start = tl.load(cu_ptr + seq).to(tl.int64)
    length = tl.load(cu_ptr + seq + 1).to(tl.int64) - start
    s = tl.load(slope_ptr + head).to(tl.float32)
    state = tl.zeros([BLOCK_D, BLOCK_V], dtype=tl.float32)
    state_ptrs = ds[:, None] * stride_s_d + es[None, :]
    smask = dmask[:, None] & emask[None, :]
    if HAS_STATE:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        state_ptrs += slot * stride_s_slot + head * stride_s_h
        if tl.load(init_ptr + seq) != 0:
            state = tl.load(state_ptr + state_ptrs, mask=smask, other=0.0).to(tl.float32)
    pos = ts.to(tl.float32)
    diff = pos[:, None] - pos[None, :]
    # exp(-s (i - j)) for j <= i: the same for every full block.
    intra_decay = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
    q_decay = tl.exp(-s * (pos + 1.0))
    for t0 in range(0, length, BLOCK_T):
        t = start + t0 + ts
        tmask = (t0 + ts) < length
        qk_mask = tmask[:, None] & dmask[None, :]
        q = tl.load(
            q_ptr + t[:, None] * stride_q_t + head * stride_q_h + ds[None, :],
            mask=qk_mask,
            other=0.0,
        ).to(tl.float32)
        k = tl.load(
            k_ptr + t[:, None] * stride_k_t + head * stride_k_h + ds[None, :],
            mask=qk_mask,
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_ptr + t[:, None] * stride_v_t + head * stride_v_h + es[None, :],
            mask=tmask[:, None] & emask[None, :],
            other=0.0,
        ).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * intra_decay  # [T, T]
        o = tl.dot(scores, v, input_precision="ieee")
        o += tl.dot(q * q_decay[:, None], state, input_precision="ieee")
        tl.store(
            o_ptr + t[:, None] * stride_o_t + head * stride_o_h + es[None, :],
            o.to(o_ptr.dtype.element_ty),
            mask=tmask[:, None] & emask[None, :],
        )
        n = tl.minimum(length - t0, BLOCK_T).to(tl.float32)
        to_end = tl.where(tmask, tl.exp(-s * (n - 1.0 - pos)), 0.0)
        state = state * tl.exp(-s * n) + tl.dot(
            tl.trans(k * to_end[:, None]), v, input_precision="ieee"
        )
    if HAS_STATE:
        tl.store(state_ptr + state_ptrs, state.to(state_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _lightning_decode_kernel(
    # pointers
    o_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    slope_ptr,
    state_ptr,
    slot_ptr,
    # sizes
    head_dim,
    value_dim,
    # strides
    stride_q_b,
    stride_q_h,
    stride_k_b,
    stride_k_h,
    stride_v_b,
    stride_v_h,
    stride_o_b,
    stride_o_h,
    stride_s_slot,
    stride_s_h,
    stride_s_d,
    # meta
    BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    es = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < head_dim
    emask = es < value_dim
    smask = dmask[:, None] & emask[None, :]
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    ptrs = state_ptr + slot * stride_s_slot + head * stride_s_h
    ptrs += ds[:, None] * stride_s_d + es[None, :]
    state = tl.load(ptrs, mask=smask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + seq * stride_q_b + head * stride_q_h + ds, mask=dmask, other=0.0)
    k = tl.load(k_ptr + seq * stride_k_b + head * stride_k_h + ds, mask=dmask, other=0.0)
    v = tl.load(v_ptr + seq * stride_v_b + head * stride_v_h + es, mask=emask, other=0.0)
    s = tl.load(slope_ptr + head).to(tl.float32)
    state = state * tl.exp(-s) + k.to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
    tl.store(ptrs, state.to(state_ptr.dtype.element_ty), mask=smask)
    o = tl.sum(q.to(tl.float32)[:, None] * state, axis=0)
    tl.store(
        o_ptr + seq * stride_o_b + head * stride_o_h + es, o.to(o_ptr.dtype.element_ty), mask=emask
    )


def _check(q, k, v, slope, kv_states) -> None:
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [T, H, D] contiguous in D, got {tuple(q.shape)}")
    tokens, heads, head_dim = q.shape
    if k.shape != q.shape or k.stride(2) != 1:
        raise ValueError(f"k must be {tuple(q.shape)} contiguous in D, got {tuple(k.shape)}")
    if v.dim() != 3 or v.shape[:2] != (tokens, heads) or v.stride(2) != 1:
        raise ValueError(f"v must be [{tokens}, {heads}, Dv], got {tuple(v.shape)}")
    if slope.shape != (heads,):
        raise ValueError(f"slope must be [{heads}], got {tuple(slope.shape)}")
    if kv_states is not None and (
        kv_states.dim() != 4
        or kv_states.shape[1:] != (heads, head_dim, v.shape[2])
        or kv_states.stride(3) != 1
    ):
        raise ValueError(
            f"kv_states must be [slots, {heads}, {head_dim}, {v.shape[2]}], "
            f"got {tuple(kv_states.shape)}"
        )


def _blocks(head_dim: int, value_dim: int) -> tuple[int, int]:
    # NOTE: at least 16 on each side: tl.dot's minimum.
    return max(16, next_power_of_2(head_dim)), max(16, min(64, next_power_of_2(value_dim)))


def lightning_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    kv_states: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    state_slots: torch.Tensor | None,
    has_initial_state: torch.Tensor | None,
    block_t: int = 32,
) -> torch.Tensor:
    """Packed sequences (cu_seqlens int32 [S + 1]) -> o [T, H, Dv] in q's dtype. With
    kv_states, sequence i starts from slot state_slots[i] when has_initial_state[i] (zeros
    otherwise) and its final state is written there."""
    _check(q, k, v, slope, kv_states)
    o = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    num_seqs = cu_seqlens.numel() - 1
    if num_seqs == 0 or q.shape[0] == 0:
        return o
    heads, head_dim, value_dim = q.shape[1], q.shape[2], v.shape[2]
    block_d, block_v = _blocks(head_dim, value_dim)
    has_state = kv_states is not None
    dummy = cu_seqlens
    grid = (num_seqs, heads, triton.cdiv(value_dim, block_v))
    _lightning_prefill_kernel[grid](
        o,
        q,
        k,
        v,
        slope,
        kv_states if has_state else q,
        cu_seqlens,
        state_slots if has_state else dummy,
        has_initial_state.to(torch.int32) if has_state else dummy,
        head_dim,
        value_dim,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o.stride(0),
        o.stride(1),
        kv_states.stride(0) if has_state else 0,
        kv_states.stride(1) if has_state else 0,
        kv_states.stride(2) if has_state else 0,
        HAS_STATE=has_state,
        BLOCK_T=max(16, next_power_of_2(block_t)),
        BLOCK_D=block_d,
        BLOCK_V=block_v,
        # NOTE: the carried state [BLOCK_D, BLOCK_V] and a block's q, k, v live in registers.
        num_warps=8 if block_d * block_v >= 64 * 64 else 4,
    )
    return o


def lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    kv_states: torch.Tensor,
    state_slots: torch.Tensor,
) -> torch.Tensor:
    """One step of B sequences (q, k [B, H, D], v [B, H, Dv]); kv_states updated at
    state_slots int64 [B] -> o [B, H, Dv]."""
    _check(q, k, v, slope, kv_states)
    o = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    if q.shape[0] == 0:
        return o
    heads, head_dim, value_dim = q.shape[1], q.shape[2], v.shape[2]
    block_d = next_power_of_2(head_dim)
    block_v = min(32, next_power_of_2(value_dim))
    grid = (q.shape[0], heads, triton.cdiv(value_dim, block_v))
    _lightning_decode_kernel[grid](
        o,
        q,
        k,
        v,
        slope,
        kv_states,
        state_slots,
        head_dim,
        value_dim,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o.stride(0),
        o.stride(1),
        kv_states.stride(0),
        kv_states.stride(1),
        kv_states.stride(2),
        BLOCK_D=block_d,
        BLOCK_V=block_v,
    )
    return o
