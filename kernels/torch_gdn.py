"""The torch path of the gated delta rule (Gated DeltaNet, Qwen3-Next), and its plain references.

Per value head h, with a recurrent state S [Dk, Dv] (fp32), per token t:
    S   = exp(g_t) * S                                  (per-head decay, g_t <= 0)
    S  += k_t (outer) beta_t * (v_t - S^T k_t)          (delta rule: write the correction)
    o_t = S^T q_t
where q and k are L2-normalised (eps 1e-6 inside the square root) and q is scaled by
Dk ** -0.5. Query/key heads are shared by Hv / Hk consecutive value heads (head h reads
q/k head h // (Hv / Hk)).

Packed variable-length batches: the step's tokens of S sequences lie one after another
([T, ...]), sequence i at rows query_start_loc[i]:query_start_loc[i + 1]; each owns a state
slot (states [slots, Hv, Dk, Dv]). A sequence with has_initial_state False starts from zeros;
its final state is written to its slot.

`chunk_gated_delta_rule` computes it chunk by chunk in the WY / UT-transform form: inside a
chunk of C tokens, the C sequential rank-1 delta updates become one unit lower-triangular solve
(I + A) [u | w] = [beta v | beta k exp(gc)], with A[i, j] = beta_i k_i.k_j exp(gc_i - gc_j)
for j < i and gc the in-chunk cumulative decay; then v' = u - w S is the correction the chunk
writes, the chunk's output is (q exp(gc)) S + (q k^T * decay, causal) v', and the state moves
on as exp(gc_last) S + (k exp(gc_last - gc))^T v'. `gated_delta_recurrence` is the
step-by-step definition the tests and the bench compare against.
"""

from __future__ import annotations

import torch

L2_EPS = 1e-6


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in fp32."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def _prepare(
    q: torch.Tensor, k: torch.Tensor, num_v_heads: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, Hk, Dk] q and k -> fp32 [T, Hv, Dk], normalised (when asked), q scaled."""
    if normalize:
        q, k = l2norm(q), l2norm(k)
    q, k = q.float() * q.shape[-1] ** -0.5, k.float()
    rep = num_v_heads // k.shape[1]
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
    return q, k


def gated_delta_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    normalize_qk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one token at a time, one sequence: q/k [L, Hk, Dk], v [L, Hv, Dv],
    g/beta [L, Hv], initial_state [Hv, Dk, Dv] or None -> (o fp32 [L, Hv, Dv], final state)."""
    length, num_v_heads, dv = v.shape
    q, k = _prepare(q, k, num_v_heads, normalize_qk)
    state = (
        initial_state.float().clone()
        if initial_state is not None
        else v.new_zeros(num_v_heads, q.shape[-1], dv, dtype=torch.float32)
    )
    out = []
    for t in range(length):
        state = state * torch.exp(g[t].float())[:, None, None]
        predicted = torch.einsum("hkv,hk->hv", state, k[t])
        delta = (v[t].float() - predicted) * beta[t].float()[:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        out.append(torch.einsum("hkv,hk->hv", state, q[t]))
    return torch.stack(out) if out else v.new_zeros(0, num_v_heads, dv), state


def chunk_gated_delta_rule_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    normalize_qk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence in the chunked WY form (shapes as `gated_delta_recurrence`)."""
    length, num_v_heads, dv = v.shape
    q, k = _prepare(q, k, num_v_heads, normalize_qk)
    v, g, beta = v.float(), g.float(), beta.float()
    state = (
        initial_state.float().clone()
        if initial_state is not None
        else v.new_zeros(num_v_heads, q.shape[-1], dv)
    )
    out = torch.empty_like(v)
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        # Heads first: [H, C, ...].
        qc, kc, vc = (t[start:end].transpose(0, 1) for t in (q, k, v))
        gc = torch.cumsum(g[start:end].t(), dim=-1)  # [H, C]
        bc = beta[start:end].t()[:, :, None]  # [H, C, 1]
        n = end - start
        lower = torch.ones(n, n, dtype=torch.bool, device=v.device).tril()
        decay = torch.exp((gc[:, :, None] - gc[:, None, :]).masked_fill(~lower, float("-inf")))
        strict = (bc * kc @ kc.transpose(1, 2)) * decay * (~torch.eye(n, dtype=torch.bool))
        system = strict + torch.eye(n, device=v.device)
        u = torch.linalg.solve_triangular(system, bc * vc, upper=False, unitriangular=True)
        w = torch.linalg.solve_triangular(
            system, bc * kc * torch.exp(gc)[:, :, None], upper=False, unitriangular=True
        )
        v_new = u - w @ state  # [H, C, Dv]
        inner = (qc @ kc.transpose(1, 2)) * decay
        o = (qc * torch.exp(gc)[:, :, None]) @ state + inner @ v_new
        out[start:end] = o.transpose(0, 1)
        last = gc[:, -1:]  # [H, 1]
        k_to_end = kc * torch.exp(last - gc)[:, :, None]
        state = state * torch.exp(last)[:, :, None] + k_to_end.transpose(1, 2) @ v_new
    return out, state


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor | None,
    query_start_loc: list[int],
    state_slots: list[int] | None,
    has_initial_state: list[bool] | None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Packed sequences: q/k [T, Hk, Dk], v [T, Hv, Dv], g/beta [T, Hv]; states
    [slots, Hv, Dk, Dv] or None (zeros in, nothing written). Returns o [T, Hv, Dv] in v's
    dtype; q and k are L2-normalised inside."""
    out = torch.empty_like(v)
    for i in range(len(query_start_loc) - 1):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end == start:
            continue
        init = None
        if states is not None and has_initial_state[i]:
            init = states[state_slots[i]]
        o, final = chunk_gated_delta_rule_one(
            q[start:end],
            k[start:end],
            v[start:end],
            g[start:end],
            beta[start:end],
            chunk_size,
            init,
        )
        out[start:end] = o.to(v.dtype)
        if states is not None:
            states[state_slots[i]] = final.to(states.dtype)
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
    """One token for each of B sequences: q/k [B, Hk, Dk], v [B, Hv, Dv], g/beta [B, Hv];
    states [slots, Hv, Dk, Dv] updated in place at state_slots int64 [B]. Returns
    o [B, Hv, Dv] in v's dtype."""
    qh, kh = _prepare(q, k, v.shape[1], True)
    state = states.index_select(0, state_slots).float()  # [B, H, Dk, Dv]
    state = state * torch.exp(g.float())[:, :, None, None]
    predicted = torch.einsum("bhkv,bhk->bhv", state, kh)
    delta = (v.float() - predicted) * beta.float()[:, :, None]
    state = state + kh[:, :, :, None] * delta[:, :, None, :]
    states.index_copy_(0, state_slots, state.to(states.dtype))
    return torch.einsum("bhkv,bhk->bhv", state, qh).to(v.dtype)
