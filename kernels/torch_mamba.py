"""The torch path of the Mamba2 (SSD) mixer's cache-aware ops, and their plain references.

Packed variable-length batches: the step's tokens of S sequences lie one after another
([T, ...]), sequence i at rows query_start_loc[i]:query_start_loc[i + 1]. Each sequence owns
one state slot: its conv state [D, K - 1] (the last K - 1 inputs of the depthwise convolution)
and its SSM state [H, P, N]. A sequence with `has_initial_state` False starts from zeros; its
final state is written to its slot either way.

The recurrence, per head h (dt after bias, softplus and clamp; A < 0):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t
    y_t     = state_t . C_t + D * x_t
B and C are shared by the H / G heads of a group (head h reads group h // (H / G)).

`ssd_chunk_scan` computes it chunk by chunk (the SSD form): inside a chunk, a masked
attention-like product with decays exp(cumsum(dt * A)); across chunks, the state is carried.
`ssd_recurrence` is the step-by-step definition the tests and the bench compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- conv1d


def causal_conv1d_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor | None,
    query_start_loc: list[int],
    state_slots: list[int] | None,
    has_initial_state: list[bool] | None,
    silu: bool = True,
) -> torch.Tensor:
    """Depthwise causal conv over packed sequences.

    x [T, D]; weight [D, K]; bias [D] or None; conv_states [slots, D, K - 1] or None (no
    cache: every sequence starts from zeros and nothing is written). Returns [T, D]."""
    width = weight.shape[1]
    out = torch.empty_like(x)
    for i in range(len(query_start_loc) - 1):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end == start:
            continue
        xs = x[start:end].t()  # [D, L]
        if conv_states is not None and has_initial_state[i]:
            prev = conv_states[state_slots[i]].to(x.dtype)
        else:
            prev = x.new_zeros(x.shape[1], width - 1)
        full = torch.cat([prev, xs], dim=1)  # [D, K - 1 + L]
        y = F.conv1d(full[None], weight[:, None, :].to(x.dtype), bias, groups=x.shape[1])[0]
        out[start:end] = (F.silu(y) if silu else y).t()
        if conv_states is not None:
            conv_states[state_slots[i]] = full[:, full.shape[1] - (width - 1) :]
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    state_slots: torch.Tensor,
    silu: bool = True,
) -> torch.Tensor:
    """One new input per sequence: x [B, D], conv_states [slots, D, K - 1] (updated in place
    at state_slots [B]). Returns [B, D]."""
    states = conv_states.index_select(0, state_slots)  # [B, D, K - 1]
    full = torch.cat([states.to(x.dtype), x[:, :, None]], dim=2)  # [B, D, K]
    y = (full * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias
    conv_states.index_copy_(0, state_slots, full[:, :, 1:].to(conv_states.dtype))
    return F.silu(y) if silu else y


# ---------------------------------------------------------------------------- SSD scan


def _expand_groups(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N] (head h reads group h // (H / G))."""
    return t.repeat_interleave(num_heads // t.shape[-2], dim=-2)


def ssd_chunk_scan_one(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, in fp32: x [L, H, P], dt [L, H] (final), A [H], B/C [L, G, N],
    initial_state [H, P, N] or None -> (y without the D term [L, H, P], final state)."""
    length, num_heads, head_dim = x.shape
    x, dt = x.float(), dt.float()
    B = _expand_groups(B.float(), num_heads)  # [L, H, N]
    C = _expand_groups(C.float(), num_heads)
    state = (
        initial_state.float().clone()
        if initial_state is not None
        else x.new_zeros(num_heads, head_dim, B.shape[-1])
    )
    y = torch.empty_like(x)
    a = dt * A.float()  # [L, H], log decay per step
    xdt = x * dt[:, :, None]
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        cum = torch.cumsum(a[start:end], dim=0)  # [Q, H]
        # Decay from source s to target l: exp(cum_l - cum_s) for s <= l.
        seg = cum[:, None, :] - cum[None, :, :]  # [l, s, H]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(seg.masked_fill(~causal[:, :, None], float("-inf")))
        scores = torch.einsum("lhn,shn->lsh", C[start:end], B[start:end]) * decay
        y_chunk = torch.einsum("lsh,shp->lhp", scores, xdt[start:end])
        # The carried state's contribution, decayed to each position.
        y_chunk += torch.einsum("lhn,hpn->lhp", C[start:end], state) * torch.exp(cum)[:, :, None]
        y[start:end] = y_chunk
        to_end = torch.exp(cum[-1][None, :] - cum)  # [Q, H]
        state = state * torch.exp(cum[-1])[:, None, None] + torch.einsum(
            "lh,lhp,lhn->hpn", to_end, xdt[start:end], B[start:end]
        )
    return y, state


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
    ssm_states: torch.Tensor | None,
    query_start_loc: list[int],
    state_slots: list[int] | None,
    has_initial_state: list[bool] | None,
) -> torch.Tensor:
    """Packed sequences: x [T, H, P], dt [T, H] (final), B/C [T, G, N]; ssm_states
    [slots, H, P, N] or None (zeros in, nothing written). Returns y [T, H, P] in x's dtype,
    with the D skip term."""
    out = torch.empty_like(x)
    for i in range(len(query_start_loc) - 1):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end == start:
            continue
        init = None
        if ssm_states is not None and has_initial_state[i]:
            init = ssm_states[state_slots[i]]
        y, final = ssd_chunk_scan_one(
            x[start:end], dt[start:end], A, B[start:end], C[start:end], chunk_size, init
        )
        if D is not None:
            y = y + x[start:end].float() * D.float()[:, None]
        out[start:end] = y.to(x.dtype)
        if ssm_states is not None:
            ssm_states[state_slots[i]] = final.to(ssm_states.dtype)
    return out


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
    """One step of B sequences: x [B, H, P], dt [B, H] (final), B/C [B, G, N]; ssm_states
    [slots, H, P, N] updated in place at state_slots [B]. Returns y [B, H, P]."""
    num_heads = x.shape[1]
    state = ssm_states.index_select(0, state_slots).float()  # [B, H, P, N]
    dt32 = dt.float()
    decay = torch.exp(dt32 * A.float())  # [B, H]
    Bh = _expand_groups(B.float(), num_heads)  # [B, H, N]
    Ch = _expand_groups(C.float(), num_heads)
    state = (
        state * decay[:, :, None, None]
        + (x.float() * dt32[:, :, None])[:, :, :, None] * Bh[:, :, None, :]
    )
    ssm_states.index_copy_(0, state_slots, state.to(ssm_states.dtype))
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y.to(x.dtype)


def ssd_recurrence(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one token at a time (one sequence; shapes as `ssd_chunk_scan_one`)."""
    length, num_heads, head_dim = x.shape
    Bh = _expand_groups(B.float(), num_heads)
    Ch = _expand_groups(C.float(), num_heads)
    state = (
        initial_state.float().clone()
        if initial_state is not None
        else x.new_zeros(num_heads, head_dim, B.shape[-1], dtype=torch.float32)
    )
    ys = []
    for t in range(length):
        dt_t = dt[t].float()
        state = (
            state * torch.exp(dt_t * A.float())[:, None, None]
            + (x[t].float() * dt_t[:, None])[:, :, None] * Bh[t][:, None, :]
        )
        ys.append(torch.einsum("hpn,hn->hp", state, Ch[t]))
    return torch.stack(ys), state
