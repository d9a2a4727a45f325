"""The torch path of lightning attention (MiniMax's linear attention with a fixed per-head
exponential decay), and its step-by-step definition.

Per head h with decay rate s_h > 0, the running state S [D, Dv] (the decayed sum of k^T v):
    S_t = exp(-s_h) * S_{t-1} + k_t^T v_t
    o_t = q_t S_t
No softmax and no 1/sqrt(D) scale: the layer normalises the output afterwards.

`lightning_prefill` computes it block by block over packed variable-length sequences: inside a
block of L tokens, the masked product (q k^T * exp(-s (i - j)) for j <= i) v; across blocks,
the carried state's part exp(-s (i + 1)) q_i S, and the state at the block's end,
exp(-s L) S + sum_j exp(-s (L - 1 - j)) k_j^T v_j. The block length is a tiling choice: any
block gives the same function. `lightning_decode` is one step per sequence, batched over the
sequences' state slots. `lightning_recurrence` is the definition the tests and the bench
compare against.

Packed batches: q, k [T, H, D], v [T, H, Dv]; sequence i at rows cu_seqlens[i]:cu_seqlens[i+1];
kv_states [slots, H, D, Dv]; a sequence with has_initial_state False starts from zeros and its
final state is written to its slot either way. fp32 accumulation; outputs in q's dtype.
"""

from __future__ import annotations

import torch


def lightning_block_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    block_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, block-wise, fp32: q, k [L, H, D], v [L, H, Dv], slope [H],
    initial_state [H, D, Dv] or None -> (o [L, H, Dv] fp32, final state [H, D, Dv] fp32)."""
    length, heads, _ = q.shape
    q, k, v = (t.float().transpose(0, 1) for t in (q, k, v))  # [H, L, *]
    s = slope.float().view(heads, 1, 1)
    state = (
        initial_state.float().clone()
        if initial_state is not None
        else q.new_zeros(heads, q.shape[-1], v.shape[-1])
    )
    out = q.new_empty(heads, length, v.shape[-1])
    for start in range(0, length, block_size):
        end = min(start + block_size, length)
        n = end - start
        idx = torch.arange(n, device=q.device, dtype=torch.float32)
        qb, kb, vb = q[:, start:end], k[:, start:end], v[:, start:end]
        diff = idx[:, None] - idx[None, :]  # [i, j]
        mask = torch.exp(-s * diff.clamp(min=0)).masked_fill(diff < 0, 0.0)  # [H, n, n]
        intra = ((qb @ kb.transpose(-1, -2)) * mask) @ vb
        inter = (qb * torch.exp(-s * (idx[:, None] + 1))) @ state
        out[:, start:end] = intra + inter
        to_end = torch.exp(-s * (n - 1 - idx[:, None]))  # [H, n, 1]
        state = state * torch.exp(-s * n) + (kb * to_end).transpose(-1, -2) @ vb
    return out.transpose(0, 1), state


def lightning_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    block_size: int,
    kv_states: torch.Tensor | None,
    cu_seqlens: list[int],
    state_slots: list[int] | None,
    has_initial_state: list[bool] | None,
) -> torch.Tensor:
    """Packed sequences -> o [T, H, Dv] in q's dtype. kv_states None: every sequence starts
    from zeros and nothing is written (the memory profile)."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    for i in range(len(cu_seqlens) - 1):
        start, end = cu_seqlens[i], cu_seqlens[i + 1]
        if end == start:
            continue
        init = None
        if kv_states is not None and has_initial_state[i]:
            init = kv_states[state_slots[i]]
        o, final = lightning_block_one(
            q[start:end], k[start:end], v[start:end], slope, block_size, init
        )
        out[start:end] = o.to(out.dtype)
        if kv_states is not None:
            kv_states[state_slots[i]] = final.to(kv_states.dtype)
    return out


def lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    kv_states: torch.Tensor,
    state_slots: torch.Tensor,
) -> torch.Tensor:
    """One token of B sequences: q, k [B, H, D], v [B, H, Dv]; kv_states [slots, H, D, Dv]
    updated in place at state_slots int64 [B]. Returns o [B, H, Dv] in q's dtype."""
    state = kv_states.index_select(0, state_slots).float()  # [B, H, D, Dv]
    decay = torch.exp(-slope.float()).view(1, -1, 1, 1)
    state.mul_(decay).add_(k.float()[..., :, None] * v.float()[..., None, :])
    kv_states.index_copy_(0, state_slots, state.to(kv_states.dtype))
    return torch.matmul(q.float()[..., None, :], state)[..., 0, :].to(q.dtype)


def lightning_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one token at a time (one sequence; shapes as `lightning_block_one`)."""
    heads = q.shape[1]
    state = (
        initial_state.float().clone()
        if initial_state is not None
        else q.new_zeros(heads, q.shape[-1], v.shape[-1], dtype=torch.float32)
    )
    decay = torch.exp(-slope.float()).view(heads, 1, 1)
    outs = []
    for t in range(q.shape[0]):
        state = state * decay + k[t].float()[:, :, None] * v[t].float()[:, None, :]
        outs.append(torch.einsum("hd,hde->he", q[t].float(), state))
    return torch.stack(outs), state
