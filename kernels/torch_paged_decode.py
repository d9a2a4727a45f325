"""Decode attention that reads the paged KV cache where it lies (the CPU torch path).

The gather path (`torch_attention`) copies every decode row's blocks into a dense buffer in
every layer and then runs SDPA over it: on CPU that copy, and SDPA reading the copy back, cost
more than the attention arithmetic. This path copies no key or value. It is two
`embedding_bag` calls, which sum table rows picked by index, each row scaled by its own weight:

- Logits. Keys are stored [NB, Hk, D, BS] in memory (`new_kv_cache`; the cache tensor is that
  storage viewed as the logical [NB, BS, Hk, D], so every other reader and writer indexes it as
  usual). Row (block, head, d) of that storage holds component d of the block's BS keys; the D
  rows of (block, head) weighted by q[d] * scale sum to the block's BS logits. One bag per
  (query row, query head, block of the row).
- Output. Values keep the usual layout: row (slot, head) is one value vector; the visible slots
  of a (query row, query head) weighted by their softmax probabilities sum to its output.

The logits take a dense [rows, Hq, width * BS] layout, width being the most blocks any row
reads; a row's bags past its own blocks are empty (zero, then masked), so nothing is padded in
the reads. Only visible slots enter the value bags: stale slots past a row's last token are
never read, whatever they hold. Soft-capping and sinks apply to the explicit fp32 logits.

The index tensors depend only on the step's batch, the sliding window and the head shape, so a
`PagedDecodeLayout` is built once per step (per window) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .reference import soft_cap_logits


def new_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed key and value caches, both shaped [NB, BS, Hk, D].

    On CPU in float32 the keys are stored [NB, Hk, D, BS] underneath (a permuted view), the
    layout `supports` asks for; elsewhere both are plain contiguous tensors.
    """
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    value = torch.zeros(shape, dtype=dtype, device=device)
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return torch.zeros(shape, dtype=dtype, device=device), value
    storage = torch.zeros((num_blocks, num_kv_heads, head_dim, block_size), dtype=dtype)
    return storage.permute(0, 3, 1, 2), value


def supports(key_cache: torch.Tensor | None, value_cache: torch.Tensor | None) -> bool:
    """True when this path can read the caches in place: CPU float32, keys stored
    [NB, Hk, D, BS] underneath (as `new_kv_cache` makes them), values contiguous."""
    return (
        key_cache is not None
        and value_cache is not None
        and key_cache.device.type == "cpu"
        and key_cache.dtype == torch.float32
        and value_cache.dtype == torch.float32
        and key_cache.permute(0, 2, 3, 1).is_contiguous()
        and value_cache.is_contiguous()
    )


@dataclass(slots=True)
class PagedDecodeLayout:
    """Index tensors of one step's decode rows for one sliding window and head shape."""

    rows: slice | torch.Tensor
    """The decode rows in q / out."""
    num_rows: int
    width: int
    """Most blocks a row reads."""
    key_index: torch.Tensor
    """int64: rows of the key table [NB * Hk * D, BS], D per non-empty bag, bags ordered
    (row, query head, block)."""
    key_offsets: torch.Tensor
    """int64 [rows * Hq * width + 1]: start of each key bag (include_last_offset form)."""
    key_query: torch.Tensor
    """int64 [non-empty key bags]: the (row, query head) whose query weights each bag."""
    visible: torch.Tensor
    """bool [rows, 1, width * BS]: which logits each row keeps."""
    value_index: torch.Tensor
    """int64: rows of the value table [NB * BS * Hk, D], the visible slots of each
    (row, query head) in logit order."""
    value_offsets: torch.Tensor
    """int64 [rows * Hq + 1]: start of each value bag."""
    value_weights: torch.Tensor
    """int64: positions in the flat [rows * Hq * width * BS] probabilities that weight the
    value rows, in value_index order."""


def build_layout(
    rows: slice | torch.Tensor,
    seq_lens: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    window: int | None,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device,
) -> PagedDecodeLayout:
    """The layout of decode rows with context lengths seq_lens [n] (all > 0) and block tables
    [n, MB] (host arrays), for `window` (None: full attention)."""
    n, bs, hq, hk = seq_lens.size, block_size, num_heads, num_kv_heads
    group = hq // hk
    last = (seq_lens - 1) // bs
    # Blocks wholly before the window are never visible: they get no bag.
    first = np.zeros_like(seq_lens) if window is None else np.maximum(seq_lens - window, 0) // bs
    count = last - first + 1
    width = int(count.max())
    cols = np.arange(width)
    used = cols[None, :] < count[:, None]  # [n, width]
    src = np.minimum(first[:, None] + cols[None, :], last[:, None])
    blocks = np.take_along_axis(block_tables, src, axis=1).astype(np.int64)  # [n, width]
    kv_head = np.arange(hq) // group

    # Keys: bag (row, head, block) = the D table rows (block * Hk + kv_head) * D + d.
    base = (blocks[:, None, :] * hk + kv_head[None, :, None]) * head_dim  # [n, hq, width]
    bag_used = np.broadcast_to(used[:, None, :], base.shape)
    key_index = (base[bag_used][:, None] + np.arange(head_dim)).reshape(-1)
    key_offsets = np.concatenate([[0], np.cumsum(bag_used.reshape(-1) * head_dim)])
    key_query = np.nonzero(bag_used.reshape(n * hq, width))[0]

    # Visibility of each logit: position (first + col) * BS + t.
    pos = ((first[:, None] + cols[None, :])[:, :, None] * bs + np.arange(bs)).reshape(n, -1)
    visible = np.repeat(used, bs, axis=1) & (pos < seq_lens[:, None])
    if window is not None:
        visible &= pos > seq_lens[:, None] - 1 - window

    # Values: bag (row, head) = that row's visible slots in logit order, table rows
    # slot * Hk + kv_head; nonzero walks (row, head, logit) in exactly that order.
    length = width * bs
    slots = (blocks[:, :, None] * bs + np.arange(bs)).reshape(n, length)
    r, h, col = np.nonzero(np.broadcast_to(visible[:, None, :], (n, hq, length)))
    value_index = slots[r, col] * hk + kv_head[h]
    value_weights = (r * hq + h) * length + col
    value_offsets = np.concatenate([[0], np.cumsum(np.repeat(visible.sum(axis=1), hq))])

    def tensor(a: np.ndarray, dtype=torch.int64) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return PagedDecodeLayout(
        rows=rows,
        num_rows=n,
        width=width,
        key_index=tensor(key_index),
        key_offsets=tensor(key_offsets),
        key_query=tensor(key_query),
        visible=tensor(visible[:, None, :], torch.bool),
        value_index=tensor(value_index),
        value_offsets=tensor(value_offsets),
        value_weights=tensor(value_weights),
    )


def paged_decode(
    layout: PagedDecodeLayout,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the layout's decode rows over the cache, read in place.

    Args:
        layout: this step's `PagedDecodeLayout` for the layer's window and heads.
        q: [T, Hq, D]; key_cache, value_cache: [NB, BS, Hk, D] that `supports` accepts.
        sinks: fp32 [Hq] or None.

    Returns:
        [rows, Hq, D] in q.dtype, for the layout's rows in order.
    """
    n, width = layout.num_rows, layout.width
    hq, d, bs = q.shape[1], q.shape[2], key_cache.shape[1]
    key_table = key_cache.permute(0, 2, 3, 1).reshape(-1, bs)  # a view: see `supports`
    value_table = value_cache.view(-1, d)
    query = q[layout.rows].reshape(n * hq, d).to(key_cache.dtype) * scale
    logits = F.embedding_bag(
        layout.key_index,
        key_table,
        layout.key_offsets,
        mode="sum",
        per_sample_weights=query.index_select(0, layout.key_query).reshape(-1),
        include_last_offset=True,
    ).view(n, hq, width * bs)
    logits = soft_cap_logits(logits, soft_cap)
    logits = logits.masked_fill(~layout.visible, float("-inf"))
    if sinks is not None:
        sink = sinks.to(logits.dtype).view(1, hq, 1).expand(n, hq, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        probs = probs.contiguous()
    else:
        probs = torch.softmax(logits, dim=-1)
    out = F.embedding_bag(
        layout.value_index,
        value_table,
        layout.value_offsets,
        mode="sum",
        per_sample_weights=probs.view(-1).index_select(0, layout.value_weights),
        include_last_offset=True,
    )
    return out.view(n, hq, d).to(q.dtype)
