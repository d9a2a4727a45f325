"""The gated delta rule (Gated DeltaNet) over packed variable-length sequences, and its fused
one-step decode update batched over state slots.

`chunk_gated_delta_rule`: one program per (sequence, value head, Dv block) walks its sequence in
chunks of BLOCK_T tokens, carrying the state [BLOCK_K, BLOCK_V] (all of Dk, a block of Dv) in
registers. Per chunk (the WY / UT-transform form): q and k are L2-normalised, q scaled; gc is
the in-chunk cumulative log decay; A[i, j] = beta_i k_i.k_j exp(gc_i - gc_j) (j < i) is
inverted as the unit lower-triangular (I + A) by forward substitution, giving
u = (I + A)^-1 (beta v) and w = (I + A)^-1 (beta k exp(gc)); the chunk's correction
v' = u - w S; its output (q exp(gc)) S + ((q k^T) * decay, causal) v'; and the state at its end
exp(gc_last) S + (k exp(gc_last - gc))^T v'. Padded rows carry k = v = beta = g = 0, so they
neither write nor decay. The chunk is a tiling choice: any BLOCK_T gives the same function.

`fused_recurrent_gated_delta_rule`: one token per sequence; one program per (sequence, value
head, Dv block) reads its slot's state, decays it, writes the delta and reads the output.

Shapes: q and k [T, Hk, Dk], v [T, Hv, Dv] (Hv a multiple of Hk: head h reads q/k head
h // (Hv / Hk)), g and beta [T, Hv] (fp32 preferred), states [slots, Hv, Dk, Dv]. fp32
accumulation. Reference: `torch_gdn.chunk_gated_delta_rule` / `fused_recurrent_gated_delta_rule`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import next_power_of_2

L2_EPS = tl.constexpr(1e-6)


@triton.jit
def _gdn_chunk_kernel(
    # pointers
    o_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    state_ptr,
    cu_ptr,
    slot_ptr,
    init_ptr,
    # sizes
    key_dim,
    value_dim,
    heads_per_key,
    scale,
    # strides
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_o_t,
    stride_o_h,
    stride_g_t,
    stride_b_t,
    stride_s_slot,
    stride_s_h,
    stride_s_k,
    # meta
    HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    vs = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    ts = tl.arange(0, BLOCK_T)
    vmask = vs < value_dim
    kmask = ks < key_dim
    khead = head // heads_per_key
    start = tl.load(cu_ptr + seq).to(tl.int64)
    length = tl.load(cu_ptr + seq + 1).to(tl.int64) - start
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    state_off = ks[:, None] * stride_s_k + vs[None, :]
    smask = kmask[:, None] & vmask[None, :]
    if HAS_STATE:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        state_off += slot * stride_s_slot + head * stride_s_h
        if tl.load(init_ptr + seq) != 0:
            state = tl.load(state_ptr + state_off, mask=smask, other=0.0).to(tl.float32)
    causal = ts[:, None] >= ts[None, :]
    strict = ts[:, None] > ts[None, :]
    eye = (ts[:, None] == ts[None, :]).to(tl.float32)
    for c0 in range(0, length, BLOCK_T):
        t = start + c0 + ts
        tmask = (c0 + ts) < length
        qk_mask = tmask[:, None] & kmask[None, :]
        q = tl.load(
            q_ptr + t[:, None] * stride_q_t + khead * stride_q_h + ks[None, :],
            mask=qk_mask,
            other=0.0,
        ).to(tl.float32)
        k = tl.load(
            k_ptr + t[:, None] * stride_k_t + khead * stride_k_h + ks[None, :],
            mask=qk_mask,
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_ptr + t[:, None] * stride_v_t + head * stride_v_h + vs[None, :],
            mask=tmask[:, None] & vmask[None, :],
            other=0.0,
        ).to(tl.float32)
        g = tl.load(g_ptr + t * stride_g_t + head, mask=tmask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + t * stride_b_t + head, mask=tmask, other=0.0).to(tl.float32)
        q = q / tl.sqrt(tl.sum(q * q, axis=1) + L2_EPS)[:, None] * scale
        k = k / tl.sqrt(tl.sum(k * k, axis=1) + L2_EPS)[:, None]
        gc = tl.cumsum(g, axis=0)  # padded rows add 0: gc of the last row is the chunk's
        decay = tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
        kk = tl.dot(k, tl.trans(k), input_precision="ieee")  # [T, T]
        a = tl.where(strict, kk * decay * beta[:, None], 0.0)
        # (I + a)^-1 by forward substitution: row i = e_i - a[i, :] @ inv (rows < i done).
        inv = eye
        for i in range(1, BLOCK_T):
            a_row = tl.sum(tl.where(ts[:, None] == i, a, 0.0), axis=0)  # [T] over columns j
            row = tl.sum(a_row[:, None] * inv, axis=0)  # sum_j a[i, j] inv[j, :]
            inv = tl.where(ts[:, None] == i, inv - row[None, :], inv)
        u = tl.dot(inv, v * beta[:, None], input_precision="ieee")  # [T, V]
        w = tl.dot(inv, k * (beta * tl.exp(gc))[:, None], input_precision="ieee")  # [T, K]
        v_new = u - tl.dot(w, state, input_precision="ieee")
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * decay
        o = tl.dot(q * tl.exp(gc)[:, None], state, input_precision="ieee")
        o += tl.dot(qk, v_new, input_precision="ieee")
        tl.store(
            o_ptr + t[:, None] * stride_o_t + head * stride_o_h + vs[None, :],
            o.to(o_ptr.dtype.element_ty),
            mask=tmask[:, None] & vmask[None, :],
        )
        last = tl.sum(tl.where(ts == BLOCK_T - 1, gc, 0.0), axis=0)
        k_to_end = k * tl.exp(last - gc)[:, None]
        state = state * tl.exp(last) + tl.dot(tl.trans(k_to_end), v_new, input_precision="ieee")
    if HAS_STATE:
        tl.store(state_ptr + state_off, state.to(state_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _gdn_recurrent_kernel(
    # pointers
    o_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    state_ptr,
    slot_ptr,
    # sizes
    key_dim,
    value_dim,
    heads_per_key,
    scale,
    # strides
    stride_q_b,
    stride_q_h,
    stride_k_b,
    stride_k_h,
    stride_v_b,
    stride_v_h,
    stride_o_b,
    stride_o_h,
    stride_g_b,
    stride_b_b,
    stride_s_slot,
    stride_s_h,
    stride_s_k,
    # meta
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    vs = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    vmask = vs < value_dim
    kmask = ks < key_dim
    smask = kmask[:, None] & vmask[None, :]
    khead = head // heads_per_key
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    ptrs = state_ptr + slot * stride_s_slot + head * stride_s_h
    ptrs += ks[:, None] * stride_s_k + vs[None, :]
    state = tl.load(ptrs, mask=smask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + seq * stride_q_b + khead * stride_q_h + ks, mask=kmask, other=0.0)
    k = tl.load(k_ptr + seq * stride_k_b + khead * stride_k_h + ks, mask=kmask, other=0.0)
    v = tl.load(v_ptr + seq * stride_v_b + head * stride_v_h + vs, mask=vmask, other=0.0)
    q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    q = q / tl.sqrt(tl.sum(q * q, axis=0) + L2_EPS) * scale
    k = k / tl.sqrt(tl.sum(k * k, axis=0) + L2_EPS)
    g = tl.load(g_ptr + seq * stride_g_b + head).to(tl.float32)
    beta = tl.load(beta_ptr + seq * stride_b_b + head).to(tl.float32)
    state = state * tl.exp(g)
    delta = (v - tl.sum(state * k[:, None], axis=0)) * beta  # [V]
    state += k[:, None] * delta[None, :]
    tl.store(ptrs, state.to(state_ptr.dtype.element_ty), mask=smask)
    o = tl.sum(state * q[:, None], axis=0)
    tl.store(
        o_ptr + seq * stride_o_b + head * stride_o_h + vs, o.to(o_ptr.dtype.element_ty), mask=vmask
    )


def _check(q, k, v, g, beta, states) -> tuple[int, int]:
    """Shapes and strides the kernels assume; returns (Hv // Hk, block of Dv)."""
    if q.dim() != 3 or q.shape != k.shape or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(
            f"q and k must be [T, Hk, Dk] contiguous in Dk, got {tuple(q.shape)} / {tuple(k.shape)}"
        )
    tokens, key_heads, key_dim = q.shape
    if v.dim() != 3 or v.shape[0] != tokens or v.stride(2) != 1:
        raise ValueError(f"v must be [{tokens}, Hv, Dv] contiguous in Dv, got {tuple(v.shape)}")
    value_heads, value_dim = v.shape[1:]
    if value_heads % key_heads:
        raise ValueError(
            f"value heads ({value_heads}) must be a multiple of key heads ({key_heads})"
        )
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (tokens, value_heads) or t.stride(1) != 1:
            raise ValueError(f"{name} must be [{tokens}, {value_heads}], got {tuple(t.shape)}")
    if states is not None and (
        states.dim() != 4
        or states.shape[1:] != (value_heads, key_dim, value_dim)
        or states.stride(3) != 1
    ):
        raise ValueError(
            f"states must be [slots, {value_heads}, {key_dim}, {value_dim}] contiguous in Dv, "
            f"got {tuple(states.shape)}"
        )
    if key_dim > 256:
        raise ValueError(f"key head dims above 256 are not supported, got {key_dim}")
    # The state tile [Dk, BLOCK_V] lives in registers: narrower Dv blocks for wide keys.
    widest = 64 if key_dim <= 64 else 32
    return value_heads // key_heads, min(widest, max(16, next_power_of_2(value_dim)))


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    state_slots: torch.Tensor | None,
    has_initial_state: torch.Tensor | None,
    block_t: int = 32,
) -> torch.Tensor:
    """q/k [T, Hk, Dk]; v [T, Hv, Dv]; g/beta [T, Hv]; states [slots, Hv, Dk, Dv] | None;
    cu_seqlens int32 [S + 1]; state_slots int64 [S]; has_initial_state bool [S]
    -> o [T, Hv, Dv] in v's dtype. The states of the sequences' slots are replaced by their
    final states (nothing is written without states)."""
    heads_per_key, block_v = _check(q, k, v, g, beta, states)
    num_seqs = cu_seqlens.numel() - 1
    out = torch.empty_like(v)
    if num_seqs == 0 or v.shape[0] == 0:
        return out
    value_heads, value_dim = v.shape[1:]
    has_state = states is not None
    dummy = cu_seqlens
    grid = (num_seqs, value_heads, triton.cdiv(value_dim, block_v))
    _gdn_chunk_kernel[grid](
        out,
        q,
        k,
        v,
        g,
        beta,
        states if has_state else v,
        cu_seqlens,
        state_slots if has_state else dummy,
        has_initial_state.to(torch.int32) if has_state else dummy,
        q.shape[2],
        value_dim,
        heads_per_key,
        q.shape[2] ** -0.5,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        g.stride(0),
        beta.stride(0),
        states.stride(0) if has_state else 0,
        states.stride(1) if has_state else 0,
        states.stride(2) if has_state else 0,
        HAS_STATE=has_state,
        BLOCK_T=block_t,
        BLOCK_K=max(16, next_power_of_2(q.shape[2])),
        BLOCK_V=block_v,
    )
    return out


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
    state_slots: torch.Tensor,
) -> torch.Tensor:
    """One token per sequence: q/k [B, Hk, Dk], v [B, Hv, Dv], g/beta [B, Hv]; states
    [slots, Hv, Dk, Dv] updated in place at state_slots int64 [B] -> o [B, Hv, Dv]."""
    heads_per_key, block_v = _check(q, k, v, g, beta, states)
    out = torch.empty_like(v)
    if v.shape[0] == 0:
        return out
    value_heads, value_dim = v.shape[1:]
    grid = (v.shape[0], value_heads, triton.cdiv(value_dim, block_v))
    _gdn_recurrent_kernel[grid](
        out,
        q,
        k,
        v,
        g,
        beta,
        states,
        state_slots,
        q.shape[2],
        value_dim,
        heads_per_key,
        q.shape[2] ** -0.5,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        g.stride(0),
        beta.stride(0),
        states.stride(0),
        states.stride(1),
        states.stride(2),
        BLOCK_K=max(16, next_power_of_2(q.shape[2])),
        BLOCK_V=block_v,
    )
    return out
