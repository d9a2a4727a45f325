"""Paged attention in plain torch, shaped for speed on CPU (the `torch` attention backend).

Decode rows (query_len 1) of all sequences are gathered into ONE padded [B, Hk, L, D] batch
and attended with a single SDPA call and a length mask; prefill rows go one sequence at a
time (their key counts differ too much to pad profitably). SDPA has no soft-cap or sink
input, so those features take an explicit fp32 softmax, chunked over queries to bound memory.
Same contract as `reference.paged_attention_ref`; the tests hold it to that reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import soft_cap_logits

# Upper bound on fp32 logits materialised at once by the explicit-softmax path (elements).
_MAX_LOGITS = 1 << 26


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    soft_cap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Masked attention on dense tensors.

    Args:
        q: [B, Hq, Q, D]; k, v: [B, Hk, L, D] (Hq % Hk == 0).
        visible: bool [B, 1, Q, L]; every row must see at least one key.
        sinks: fp32 [Hq] or None.

    Returns:
        [B, Hq, Q, D] in q.dtype.
    """
    if not soft_cap and sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible, scale=scale, enable_gqa=True
        )
    b, hq, nq, d = q.shape
    hk, seq = k.shape[1], k.shape[2]
    group = hq // hk
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]  # [B, Hk, 1, L, D]
    out = torch.empty_like(q)
    chunk = max(1, _MAX_LOGITS // max(1, b * hq * seq))
    for s in range(0, nq, chunk):
        # Query heads of one KV group sit together: [B, Hk, G, Qc, D] shares K/V by broadcast.
        qc = q[:, :, s : s + chunk].float().reshape(b, hk, group, -1, d)
        logits = (qc @ kf.transpose(-1, -2)) * scale  # [B, Hk, G, Qc, L]
        logits = soft_cap_logits(logits, soft_cap)
        logits = logits.masked_fill(~visible[:, :, None, s : s + chunk], float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(1, hk, group, 1, 1).expand(b, -1, -1, logits.shape[3], 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(logits, dim=-1)
        out[:, :, s : s + chunk] = (probs @ vf).reshape(b, hq, -1, d).to(q.dtype)
    return out


def _gather_blocks(
    cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int
) -> torch.Tensor:
    """[NB, BS, Hk, D] cache + [B, MB] tables -> [B, Hk, num_blocks * BS, D].

    The caller slices off the tail past each sequence's length (it holds stale data).
    """
    ids = block_tables[:, :num_blocks].long()
    gathered = cache[ids]  # [B, nb, BS, Hk, D]
    b, nb, bs, hk, d = gathered.shape
    return gathered.reshape(b, nb * bs, hk, d).transpose(1, 2)


def _decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_len: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One SDPA over all decode rows. q: [B, Hq, D] -> [B, Hq, D]."""
    block_size = key_cache.shape[1]
    lens = seq_lens.to(q.device).long()[:, None]  # [B, 1]
    # Gather only what some row can see: the last `window` positions, else everything.
    span = max_len if sliding_window is None else min(max_len, sliding_window)
    first = (lens - span).clamp(min=0)
    pos = first + torch.arange(span, device=q.device)[None, :]  # [B, span] absolute positions
    visible = pos < lens
    # NOTE: positions past a row's end are redirected to that row's first gathered position,
    # which holds a real token. Unowned slots may hold stale data or NaN (torch.empty), and a
    # NaN key or value poisons SDPA's sums even when its logit is masked.
    pos = torch.where(visible, pos, first)
    blocks = block_tables.long().gather(1, pos // block_size)
    blocks = blocks.clamp(0, key_cache.shape[0] - 1)  # only matters for seq_len-0 rows
    offsets = pos % block_size
    # Two-index gather works for any cache strides; [B, span, Hk, D] -> [B, Hk, span, D].
    k = key_cache[blocks, offsets].transpose(1, 2)
    v = value_cache[blocks, offsets].transpose(1, 2)
    # A seq_len-0 row (graph padding) would see nothing: let it see key 0, zero it afterwards.
    empty = lens[:, 0] == 0
    visible[:, 0] |= empty
    out = _attend(q[:, :, None], k, v, visible[:, None, None], scale, soft_cap, sinks)[:, :, 0]
    return out.masked_fill(empty[:, None, None], 0.0)


def paged_attention_torch(
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention, torch path; contract of `reference.paged_attention_ref`.

    Args:
        q: [T, Hq, D]; key_cache, value_cache: [NB, BS, Hk, D]; block_tables: int [S, MB];
        seq_lens: int [S]; cu_seqlens_q: int [S + 1]; sinks: fp32 [Hq] or None.
        out: optional [T, Hq, D] buffer.

    Returns:
        [T, Hq, D]; rows not covered by cu_seqlens_q are zero (or untouched in `out`).
    """
    if out is None:
        out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()  # host copies: the scheduler built these on the host anyway
    lens = seq_lens.tolist()
    query_lens = [cu[i + 1] - cu[i] for i in range(len(lens))]
    block_size = key_cache.shape[1]

    decode = [i for i, n in enumerate(query_lens) if n == 1]
    if decode:
        idx = torch.tensor(decode, device=q.device)
        rows = torch.tensor([cu[i] for i in decode], device=q.device)
        out[rows] = _decode(
            q[rows], key_cache, value_cache, block_tables[idx], seq_lens[idx],
            max(lens[i] for i in decode), scale, sliding_window, soft_cap, sinks,
        )  # fmt: skip

    for i, n in enumerate(query_lens):
        if n <= 1:
            continue
        seq_len = lens[i]
        # Keys before the first query's window are never visible: skip gathering them.
        lo = 0 if sliding_window is None else max(0, seq_len - n - sliding_window + 1)
        num_blocks = -(-seq_len // block_size)
        k = _gather_blocks(key_cache, block_tables[i : i + 1], num_blocks)[:, :, lo:seq_len]
        v = _gather_blocks(value_cache, block_tables[i : i + 1], num_blocks)[:, :, lo:seq_len]
        pos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
        j = torch.arange(lo, seq_len, device=q.device)[None, :]
        visible = j <= pos
        if sliding_window is not None:
            visible &= j > pos - sliding_window
        qi = q[cu[i] : cu[i + 1]].transpose(0, 1)[None]  # [1, Hq, n, D]
        o = _attend(qi, k, v, visible[None, None], scale, soft_cap, sinks)
        out[cu[i] : cu[i + 1]] = o[0].transpose(0, 1)
    return out
