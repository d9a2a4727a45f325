"""The Mamba2 SSD scan over packed variable-length sequences, and its one-step decode update.

`ssd_chunk_scan`: one program per (sequence, head, head_dim block) walks its sequence in chunks
of BLOCK_Q tokens, carrying the state [BLOCK_P, N] in registers from chunk to chunk (the
"parallel scan + chunk carry"): per chunk, the cumulative log decay cum = cumsum(dt * A); the
intra-chunk output (C B^T masked causally and weighted by exp(cum_l - cum_s)) @ (dt x); the
carried state's output exp(cum_l) * C state^T; then the state at the chunk's end,
exp(cum_last) * state + (dt x exp(cum_last - cum))^T B. The chunk is a tiling choice: any
BLOCK_Q gives the same function. Sequences start from their slot's state (has_initial_state)
or zeros; the final state is written to the slot.

`selective_state_update`: one token per sequence; one program per (sequence, head, head_dim
block) reads its slot's state, applies one step and writes it back.

Shapes: x [T, H, P], dt [T, H] (after bias, softplus and clamp), A [H] (negative), B and C
[T, G, N] (head h reads group h // (H / G)), D [H], ssm_states [slots, H, P, N]. fp32
accumulation. Reference: `torch_mamba.ssd_chunk_scan` / `selective_state_update`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import next_power_of_2


@triton.jit
def _ssd_scan_kernel(
    # pointers
    y_ptr,
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    state_ptr,
    cu_ptr,
    slot_ptr,
    init_ptr,
    # sizes
    head_dim,
    state_size,
    heads_per_group,
    # strides
    stride_x_t,
    stride_x_h,
    stride_y_t,
    stride_y_h,
    stride_dt_t,
    stride_b_t,
    stride_b_g,
    stride_c_t,
    stride_c_g,
    stride_s_slot,
    stride_s_h,
    stride_s_p,
    # meta
    HAS_D: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    qs = tl.arange(0, BLOCK_Q)
    pmask = ps < head_dim
    nmask = ns < state_size
    group = head // heads_per_group
    start = tl.load(cu_ptr + seq).to(tl.int64)
    length = tl.load(cu_ptr + seq + 1).to(tl.int64) - start
    a = tl.load(A_ptr + head).to(tl.float32)
    d = 0.0
    if HAS_D:
        d = tl.load(D_ptr + head).to(tl.float32)
    state = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    state_ptrs = ps[:, None] * stride_s_p + ns[None, :]
    smask = pmask[:, None] & nmask[None, :]
    if HAS_STATE:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        state_ptrs += slot * stride_s_slot + head * stride_s_h
        if tl.load(init_ptr + seq) != 0:
            state = tl.load(state_ptr + state_ptrs, mask=smask, other=0.0).to(tl.float32)
    causal = qs[:, None] >= qs[None, :]
    for c0 in range(0, length, BLOCK_Q):
        t = start + c0 + qs
        qmask = (c0 + qs) < length
        dt = tl.load(dt_ptr + t * stride_dt_t + head, mask=qmask, other=0.0).to(tl.float32)
        cum = tl.cumsum(dt * a, axis=0)  # [Q]; padded rows add 0
        x = tl.load(
            x_ptr + t[:, None] * stride_x_t + head * stride_x_h + ps[None, :],
            mask=qmask[:, None] & pmask[None, :],
            other=0.0,
        ).to(tl.float32)
        b = tl.load(
            B_ptr + t[:, None] * stride_b_t + group * stride_b_g + ns[None, :],
            mask=qmask[:, None] & nmask[None, :],
            other=0.0,
        ).to(tl.float32)
        c = tl.load(
            C_ptr + t[:, None] * stride_c_t + group * stride_c_g + ns[None, :],
            mask=qmask[:, None] & nmask[None, :],
            other=0.0,
        ).to(tl.float32)
        xdt = x * dt[:, None]
        scores = tl.dot(c, tl.trans(b), input_precision="ieee")  # [Q, Q]
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        y = tl.dot(scores * decay, xdt, input_precision="ieee")  # [Q, P]
        y += tl.dot(c, tl.trans(state), input_precision="ieee") * tl.exp(cum)[:, None]
        if HAS_D:
            y += x * d
        tl.store(
            y_ptr + t[:, None] * stride_y_t + head * stride_y_h + ps[None, :],
            y.to(y_ptr.dtype.element_ty),
            mask=qmask[:, None] & pmask[None, :],
        )
        last = tl.sum(tl.where(qs == tl.minimum(length - c0, BLOCK_Q) - 1, cum, 0.0), axis=0)
        to_end = tl.where(qmask, tl.exp(last - cum), 0.0)
        state = state * tl.exp(last) + tl.dot(
            tl.trans(xdt * to_end[:, None]), b, input_precision="ieee"
        )
    if HAS_STATE:
        tl.store(state_ptr + state_ptrs, state.to(state_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _state_update_kernel(
    # pointers
    y_ptr,
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    state_ptr,
    slot_ptr,
    # sizes
    head_dim,
    state_size,
    heads_per_group,
    # strides
    stride_x_b,
    stride_x_h,
    stride_y_b,
    stride_y_h,
    stride_dt_b,
    stride_b_b,
    stride_b_g,
    stride_c_b,
    stride_c_g,
    stride_s_slot,
    stride_s_h,
    stride_s_p,
    # meta
    HAS_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    pmask = ps < head_dim
    nmask = ns < state_size
    smask = pmask[:, None] & nmask[None, :]
    group = head // heads_per_group
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    ptrs = state_ptr + slot * stride_s_slot + head * stride_s_h
    ptrs += ps[:, None] * stride_s_p + ns[None, :]
    state = tl.load(ptrs, mask=smask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + seq * stride_x_b + head * stride_x_h + ps, mask=pmask, other=0.0)
    x = x.to(tl.float32)
    dt = tl.load(dt_ptr + seq * stride_dt_b + head).to(tl.float32)
    a = tl.load(A_ptr + head).to(tl.float32)
    b = tl.load(B_ptr + seq * stride_b_b + group * stride_b_g + ns, mask=nmask, other=0.0)
    c = tl.load(C_ptr + seq * stride_c_b + group * stride_c_g + ns, mask=nmask, other=0.0)
    state = state * tl.exp(dt * a) + (x * dt)[:, None] * b.to(tl.float32)[None, :]
    tl.store(ptrs, state.to(state_ptr.dtype.element_ty), mask=smask)
    y = tl.sum(state * c.to(tl.float32)[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + head).to(tl.float32)
    tl.store(
        y_ptr + seq * stride_y_b + head * stride_y_h + ps, y.to(y_ptr.dtype.element_ty), mask=pmask
    )


def _check(x, dt, A, B, C, ssm_states) -> None:
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"x must be [T, H, P] contiguous in P, got {tuple(x.shape)}")
    tokens, heads, head_dim = x.shape
    if dt.shape != (tokens, heads) or dt.stride(1) != 1:
        raise ValueError(f"dt must be [{tokens}, {heads}], got {tuple(dt.shape)}")
    if A.shape != (heads,):
        raise ValueError(f"A must be [{heads}], got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 3 or t.shape[0] != tokens or heads % t.shape[1] or t.stride(2) != 1:
            raise ValueError(f"{name} must be [{tokens}, G, N] with G dividing {heads}")
    if ssm_states is not None and (
        ssm_states.dim() != 4
        or ssm_states.shape[1:] != (heads, head_dim, B.shape[2])
        or ssm_states.stride(3) != 1
    ):
        raise ValueError(
            f"ssm_states must be [slots, {heads}, {head_dim}, {B.shape[2]}], "
            f"got {tuple(ssm_states.shape)}"
        )


def _blocks(head_dim: int, state_size: int) -> tuple[int, int]:
    # NOTE: at least 16 on each side: tl.dot's minimum.
    return max(16, min(64, next_power_of_2(head_dim))), max(16, next_power_of_2(state_size))


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    ssm_states: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    state_slots: torch.Tensor | None,
    has_initial_state: torch.Tensor | None,
    block_q: int = 32,
) -> torch.Tensor:
    """Packed sequences (cu_seqlens int32 [S + 1]) -> y [T, H, P] in x's dtype, with the D
    term. With ssm_states, sequence i starts from slot state_slots[i] when
    has_initial_state[i] (zeros otherwise) and its final state is written there."""
    _check(x, dt, A, B, C, ssm_states)
    y = torch.empty_like(x)
    num_seqs = cu_seqlens.numel() - 1
    if num_seqs == 0 or x.shape[0] == 0:
        return y
    heads, head_dim, state_size = x.shape[1], x.shape[2], B.shape[2]
    block_p, block_n = _blocks(head_dim, state_size)
    has_state = ssm_states is not None
    dummy = cu_seqlens
    grid = (num_seqs, heads, triton.cdiv(head_dim, block_p))
    _ssd_scan_kernel[grid](
        y,
        x,
        dt,
        A,
        B,
        C,
        D if D is not None else A,
        ssm_states if has_state else x,
        cu_seqlens,
        state_slots if has_state else dummy,
        has_initial_state.to(torch.int32) if has_state else dummy,
        head_dim,
        state_size,
        heads // B.shape[1],
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        dt.stride(0),
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
        ssm_states.stride(0) if has_state else 0,
        ssm_states.stride(1) if has_state else 0,
        ssm_states.stride(2) if has_state else 0,
        HAS_D=D is not None,
        HAS_STATE=has_state,
        BLOCK_Q=max(16, block_q),
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        # NOTE: the carried state [BLOCK_P, BLOCK_N] and a chunk's B and C live in registers.
        num_warps=8,
    )
    return y


def selective_state_update(
    ssm_states: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    state_slots: torch.Tensor,
) -> torch.Tensor:
    """One step of B sequences (x [B, H, P]); ssm_states updated at state_slots int64 [B]
    -> y [B, H, P]."""
    _check(x, dt, A, B, C, ssm_states)
    y = torch.empty_like(x)
    if x.shape[0] == 0:
        return y
    heads, head_dim, state_size = x.shape[1], x.shape[2], B.shape[2]
    block_p = min(32, next_power_of_2(head_dim))
    block_n = next_power_of_2(state_size)
    grid = (x.shape[0], heads, triton.cdiv(head_dim, block_p))
    _state_update_kernel[grid](
        y,
        x,
        dt,
        A,
        B,
        C,
        D if D is not None else A,
        ssm_states,
        state_slots,
        head_dim,
        state_size,
        heads // B.shape[1],
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        dt.stride(0),
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
        ssm_states.stride(0),
        ssm_states.stride(1),
        ssm_states.stride(2),
        HAS_D=D is not None,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
    )
    return y
