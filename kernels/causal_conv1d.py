"""Depthwise causal conv1d of the Mamba2 mixer, with per-sequence conv states in slots.

Prefill (`causal_conv1d_prefill`): packed sequences (x [T, D], sequence i at rows
cu_seqlens[i]:cu_seqlens[i + 1]); one program per (sequence, channel block) walks the sequence
in token tiles. The K - 1 inputs before a sequence's first token come from its conv state
(has_initial_state) or are zeros; at the end the last K - 1 inputs become the new state.
Decode (`causal_conv1d_update`): one new input per sequence, one program per (sequence, channel
block). Both apply SiLU; fp32 accumulation. Reference: `torch_mamba.causal_conv1d_*`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import next_power_of_2


@triton.jit
def _conv_prefill_kernel(
    # pointers
    out_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    state_ptr,
    cu_ptr,
    slot_ptr,
    init_ptr,
    # sizes
    dim,
    # strides
    stride_x,
    stride_out,
    stride_w,
    stride_state_slot,
    stride_state_d,
    # meta
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    seq = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < dim
    start = tl.load(cu_ptr + seq).to(tl.int64)
    length = tl.load(cu_ptr + seq + 1).to(tl.int64) - start
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    slot = 0
    init_scale = 0.0  # 1 when the sequence continues from its state, else 0 (zeros before it)
    if HAS_STATE:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        init_scale = (tl.load(init_ptr + seq) != 0).to(tl.float32)
    state_row = state_ptr + slot * stride_state_slot + cols * stride_state_d
    rows = tl.arange(0, BLOCK_L)
    for t0 in range(0, length, BLOCK_L):
        t = t0 + rows
        tmask = t < length
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32) + bias[None, :]
        for k in tl.static_range(K):
            src = t - (K - 1) + k  # input position read by tap k
            xv = tl.load(
                x_ptr + (start + src)[:, None] * stride_x + cols[None, :],
                mask=(src >= 0)[:, None] & tmask[:, None] & cmask[None, :],
                other=0.0,
            ).to(tl.float32)
            if HAS_STATE:
                # Positions before the sequence: state column K - 1 + src.
                sv = tl.load(
                    state_row[None, :] + (K - 1 + src)[:, None],
                    mask=(src < 0)[:, None] & tmask[:, None] & cmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                xv += sv * init_scale
            w = tl.load(w_ptr + cols * stride_w + k, mask=cmask, other=0.0).to(tl.float32)
            acc += xv * w[None, :]
        acc = acc / (1.0 + tl.exp(-acc))  # SiLU
        tl.store(
            out_ptr + (start + t)[:, None] * stride_out + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=tmask[:, None] & cmask[None, :],
        )
    if HAS_STATE:
        # The new state: the last K - 1 inputs (old state columns where the sequence is
        # shorter). All old columns are read before any is written.
        j = tl.arange(0, BLOCK_K)
        src = length - (K - 1) + j
        jmask = j < K - 1
        m2 = jmask[:, None] & cmask[None, :]
        from_x = tl.load(
            x_ptr + (start + src)[:, None] * stride_x + cols[None, :],
            mask=m2 & (src >= 0)[:, None],
            other=0.0,
        )
        from_state = tl.load(
            state_row[None, :] + (K - 1 + src)[:, None],
            mask=m2 & (src < 0)[:, None],
            other=0.0,
        )
        from_state = (from_state.to(tl.float32) * init_scale).to(from_x.dtype)
        tl.debug_barrier()
        tl.store(
            state_row[None, :] + j[:, None],
            (from_x + from_state).to(state_ptr.dtype.element_ty),
            mask=m2,
        )


@triton.jit
def _conv_update_kernel(
    # pointers
    out_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    state_ptr,
    slot_ptr,
    # sizes
    dim,
    # strides
    stride_x,
    stride_out,
    stride_w,
    stride_state_slot,
    stride_state_d,
    # meta
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < dim
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K - 1
    m2 = cmask[:, None] & kmask[None, :]
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    state_row = state_ptr + slot * stride_state_slot + cols * stride_state_d
    x = tl.load(x_ptr + seq * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
    # Taps 0..K-2 read the state, tap K-1 the new input.
    state = tl.load(state_row[:, None] + ks[None, :], mask=m2, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=m2, other=0.0)
    acc = tl.sum(state * w.to(tl.float32), axis=1)
    acc += x * tl.load(w_ptr + cols * stride_w + (K - 1), mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    # The state shifts by one and takes the new input last; every read happens before the
    # writes.
    later = tl.load(
        state_row[:, None] + (ks + 1)[None, :],
        mask=cmask[:, None] & (ks + 1 < K - 1)[None, :],
        other=0.0,
    ).to(tl.float32)
    shifted = tl.where((ks == K - 2)[None, :], x[:, None], later)
    tl.debug_barrier()
    tl.store(state_row[:, None] + ks[None, :], shifted.to(state_ptr.dtype.element_ty), mask=m2)
    acc = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + seq * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def _check(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, D] with a contiguous last dim, got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(f"weight must be [D, K] contiguous in K, got {tuple(weight.shape)}")
    if conv_states is not None and (
        conv_states.dim() != 3
        or conv_states.shape[1:] != (x.shape[1], weight.shape[1] - 1)
        or conv_states.stride(2) != 1
    ):
        raise ValueError(
            f"conv_states must be [slots, {x.shape[1]}, {weight.shape[1] - 1}], "
            f"got {tuple(conv_states.shape)}"
        )
    if weight.shape[1] > 9:
        raise ValueError(f"conv kernels wider than 9 are not supported, got {weight.shape[1]}")


def causal_conv1d_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    state_slots: torch.Tensor | None,
    has_initial_state: torch.Tensor | None,
) -> torch.Tensor:
    """x [T, D]; weight [D, K]; bias [D] | None; conv_states [slots, D, K - 1] | None;
    cu_seqlens int32 [S + 1]; state_slots int64 [S]; has_initial_state bool [S]
    -> silu(conv) [T, D]. The states of the sequences' slots are replaced."""
    _check(x, weight, conv_states)
    num_seqs = cu_seqlens.numel() - 1
    out = torch.empty_like(x)
    if num_seqs == 0 or x.shape[0] == 0:
        return out
    dim, width = x.shape[1], weight.shape[1]
    block_d = min(64, next_power_of_2(dim))
    has_state = conv_states is not None
    dummy = cu_seqlens
    grid = (num_seqs, triton.cdiv(dim, block_d))
    _conv_prefill_kernel[grid](
        out,
        x,
        weight,
        bias if bias is not None else dummy,
        conv_states if has_state else x,
        cu_seqlens,
        state_slots if has_state else dummy,
        has_initial_state.to(torch.int32) if has_state else dummy,
        dim,
        x.stride(0),
        out.stride(0),
        weight.stride(0),
        conv_states.stride(0) if has_state else 0,
        conv_states.stride(1) if has_state else 0,
        K=width,
        BLOCK_K=max(2, next_power_of_2(width - 1)),
        HAS_BIAS=bias is not None,
        HAS_STATE=has_state,
        BLOCK_D=block_d,
        BLOCK_L=16,
    )
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    state_slots: torch.Tensor,
) -> torch.Tensor:
    """x [B, D] (one new input per sequence); conv_states [slots, D, K - 1] updated at
    state_slots int64 [B] -> silu(conv) [B, D]."""
    _check(x, weight, conv_states)
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    dim = x.shape[1]
    block_d = min(128, next_power_of_2(dim))
    grid = (x.shape[0], triton.cdiv(dim, block_d))
    _conv_update_kernel[grid](
        out,
        x,
        weight,
        bias if bias is not None else state_slots,
        conv_states,
        state_slots,
        dim,
        x.stride(0),
        out.stride(0),
        weight.stride(0),
        conv_states.stride(0),
        conv_states.stride(1),
        K=weight.shape[1],
        BLOCK_K=max(2, next_power_of_2(weight.shape[1] - 1)),
        HAS_BIAS=bias is not None,
        BLOCK_D=block_d,
    )
    return out
