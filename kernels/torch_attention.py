"""Paged attention and the KV-cache write in plain torch, shaped for speed on CPU.

This is the `torch` attention backend (dispatch's CPU path). Decode rows (query_len 1) read
the cache in place (`torch_paged_decode`) when its layout allows: CPU float32 caches made by
`torch_paged_decode.new_kv_cache`, as the worker's torch backend allocates them. With plain
caches they take the gather path: sorted by context length and cut into a few runs of
similar length, each run gathers its blocks out of the paged cache into reused scratch
buffers and takes ONE SDPA call, padded only to its own longest context (padding blocks
re-read the row's first block). The slots past a row's last token in its last block are
masked, but a NaN there would still poison SDPA's sums, so they are cleared after the gather,
unless the caller vouches that the cache keeps them finite (`clean_tails`: true of caches
written only through `write_kv_cache_torch`, which clears a block when its first token is
written). The query heads of a KV head go in as that head's query rows, so GQA needs no
expanded keys. Prefill rows go one sequence at a time; a sequence without a cached prefix
attends over this step's own keys, causally, without reading the cache.

The step's layout (in-place indices, or runs with gather indices and masks; per sliding
window) lives in a `TorchAttentionPlan` that is built once per step and shared by every layer.
SDPA has no soft-cap or sink input, so those features take an explicit fp32 softmax, chunked
over queries to bound memory. Same contract as `reference.paged_attention_ref`; the tests hold it to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import torch_paged_decode
from ._checks import FP8_KV_DTYPES
from .reference import kv_dequantize_ref, kv_quantize_ref, soft_cap_logits
from .torch_paged_decode import PagedDecodeLayout, paged_decode

# Upper bound on fp32 logits materialised at once by the explicit-softmax path (elements).
_MAX_LOGITS = 1 << 26


class Workspace:
    """Gather buffers reused across layers and steps.

    NOTE: a fresh multi-megabyte tensor every layer costs page faults that can take longer than
    the attention itself; one owner (a worker's backend) keeps one workspace.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
        """The first n rows of buffer `name`, shaped [n, *like.shape[1:]]."""
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.shape[0] < n
            or buf.shape[1:] != like.shape[1:]
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            capacity = max(n + n // 4, buf.shape[0] if buf is not None else 0)
            buf = torch.empty((capacity, *like.shape[1:]), dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:n]

    def gather(self, name: str, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """cache[blocks] ([n, BS, Hk, D]) written into the reused buffer `name`."""
        return torch.index_select(cache, 0, blocks, out=self._buffer(name, blocks.shape[0], cache))


@dataclass(slots=True)
class _Layout:
    """Where one decode run reads its keys, for one sliding window."""

    blocks: torch.Tensor
    """int64 [n * width] cache block of each gathered block."""
    width: int
    """Blocks gathered per row."""
    visible: torch.Tensor
    """bool [n, 1, 1, width * BS]: which gathered positions each row attends to."""
    stale: torch.Tensor | None
    """int64 gathered positions (of [n * width * BS]) past their row's last token, cleared
    after the gather; None when there are none or the cache keeps them clean."""


@dataclass(slots=True)
class _DecodeRun:
    """Decode rows of similar context length, attended with one SDPA call."""

    rows: slice | torch.Tensor
    """Their rows in q / out."""
    seqs: slice | torch.Tensor
    """Their rows in block_tables."""
    seq_lens: np.ndarray
    """int64 [n] context lengths (host)."""
    layouts: dict[int | None, _Layout] = field(default_factory=dict)


@dataclass(slots=True)
class _PrefillSeq:
    """One sequence with a multi-token query (or any sequence when there is no cache)."""

    seq: int
    start: int
    end: int
    seq_len: int
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)


def _host(t: torch.Tensor | np.ndarray | list[int]) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.cpu().numpy().astype(np.int64)
    return np.asarray(t, dtype=np.int64)


def _index(idx: np.ndarray, device: torch.device) -> slice | torch.Tensor:
    """A slice when idx is a contiguous ascending range (views instead of copies)."""
    if idx.size and (idx.size == 1 or bool(np.all(np.diff(idx) == 1))):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return torch.from_numpy(idx).to(device)


def _split_runs(num_blocks: np.ndarray, start: int, end: int, depth: int) -> list[tuple[int, int]]:
    """Split sorted rows [start, end) where padding each row to its run's widest saves most."""
    n = end - start
    if depth == 0 or n < 2:
        return [(start, end)]
    widths = num_blocks[start:end]
    head_max = np.maximum.accumulate(widths)
    tail_max = np.maximum.accumulate(widths[::-1])[::-1]
    ks = np.arange(1, n)
    costs = ks * head_max[:-1] + (n - ks) * tail_max[1:]
    best = int(costs.argmin())
    whole = n * int(head_max[-1])
    if costs[best] > 0.85 * whole or whole - costs[best] < 16:
        return [(start, end)]
    split = start + best + 1
    return _split_runs(num_blocks, start, split, depth - 1) + _split_runs(
        num_blocks, split, end, depth - 1
    )


class TorchAttentionPlan:
    """Host-side layout of one step's batch, built once and shared by all layers.

    Args:
        seq_lens: [S] context length of each sequence after this step (tensor, array or list).
        cu_seqlens_q: [S + 1] offsets of each sequence's query rows.
        block_tables: int [S, MB] (device tensor), or None when there is no cache.
        block_size: the cache's block size, or None when there is no cache (then every
            sequence must be all new: seq_len == query_len, keys passed in directly).
        workspace: gather buffers to reuse; a fresh one when None.
        device: where index tensors go (defaults to block_tables' device, else CPU).
        clean_tails: the caller vouches that the slots past each sequence's last token in its
            last block hold finite values (the cache is written only through
            `write_kv_cache_torch`); they are then not cleared after each gather.
    """

    def __init__(
        self,
        seq_lens: torch.Tensor | np.ndarray | list[int],
        cu_seqlens_q: torch.Tensor | np.ndarray | list[int],
        block_tables: torch.Tensor | None = None,
        block_size: int | None = None,
        *,
        workspace: Workspace | None = None,
        device: torch.device | None = None,
        clean_tails: bool = False,
    ) -> None:
        lens, cu = _host(seq_lens), _host(cu_seqlens_q)
        if cu.shape[0] != lens.shape[0] + 1:
            raise ValueError(f"cu_seqlens_q has {cu.shape[0]} entries for {lens.shape[0]} seqs")
        self.block_tables = block_tables
        self.block_size = block_size
        self.workspace = workspace if workspace is not None else Workspace()
        self.clean_tails = clean_tails
        if device is None:
            device = block_tables.device if block_tables is not None else torch.device("cpu")
        self.device = device
        self.first_row, self.end_row = int(cu[0]), int(cu[-1])
        query_lens = cu[1:] - cu[:-1]
        # NOTE: a seq_len-0 row (CUDA-graph padding) attends to nothing; its output is zero.
        empty = np.flatnonzero((lens == 0) & (query_lens > 0))
        self.empty_rows = [(int(cu[i]), int(cu[i + 1])) for i in empty.tolist()]
        live = (lens > 0) & (query_lens > 0)
        batched = live & (query_lens == 1) if block_size else np.zeros_like(live)
        decode_seqs = np.flatnonzero(batched)
        self.decode_runs = self._init_decode_runs(decode_seqs, lens, cu)
        self._decode = (decode_seqs, lens[decode_seqs], cu[decode_seqs])
        self._paged: dict[tuple[int | None, int, int, int], PagedDecodeLayout] = {}
        self.prefills = [
            _PrefillSeq(i, int(cu[i]), int(cu[i + 1]), int(lens[i]))
            for i in np.flatnonzero(live & ~batched).tolist()
        ]

    def _init_decode_runs(
        self, seqs: np.ndarray, lens: np.ndarray, cu: np.ndarray
    ) -> list[_DecodeRun]:
        if seqs.size == 0:
            return []
        seqs = seqs[np.argsort(lens[seqs], kind="stable")]  # shortest first
        num_blocks = -(-lens[seqs] // self.block_size)
        runs = []
        for start, end in _split_runs(num_blocks, 0, seqs.size, depth=2):
            part = seqs[start:end]
            runs.append(
                _DecodeRun(_index(cu[part], self.device), _index(part, self.device), lens[part])
            )
        return runs

    @property
    def num_decodes(self) -> int:
        """Rows batched as decodes."""
        return sum(run.seq_lens.size for run in self.decode_runs)

    def decode_layout(self, run: _DecodeRun, window: int | None) -> _Layout:
        """The run's gather indices and mask for `window` (cached)."""
        layout = run.layouts.get(window)
        if layout is None:
            layout = self._build_layout(run, window)
            run.layouts[window] = layout
        return layout

    def paged_layout(
        self, window: int | None, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> PagedDecodeLayout:
        """All decode rows' in-place layout for `window` and the head shape (cached)."""
        key = (window, num_heads, num_kv_heads, head_dim)
        layout = self._paged.get(key)
        if layout is None:
            seqs, lens, rows = self._decode
            tables = self.block_tables[torch.from_numpy(seqs).to(self.block_tables.device)]
            layout = torch_paged_decode.build_layout(
                _index(rows, self.device), lens, tables.cpu().numpy(), self.block_size, window,
                num_heads, num_kv_heads, head_dim, self.device,
            )  # fmt: skip
            self._paged[key] = layout
        return layout

    def _build_layout(self, run: _DecodeRun, window: int | None) -> _Layout:
        bs, lens = self.block_size, run.seq_lens
        last = (lens - 1) // bs
        # Blocks wholly before the window are never visible: skip gathering them.
        first = np.zeros_like(lens) if window is None else np.maximum(lens - window, 0) // bs
        width = int((last - first).max()) + 1
        cols = first[:, None] + np.arange(width)[None, :]
        # Padding columns re-read the row's first gathered block: a valid id, and full of
        # real tokens unless it is also the row's last block. Masked out either way.
        src = np.where(cols > last[:, None], first[:, None], cols)
        tables = self.block_tables[run.seqs].long()
        blocks = torch.gather(tables, 1, torch.from_numpy(src).to(tables.device)).reshape(-1)
        pos = (cols[:, :, None] * bs + np.arange(bs)).reshape(lens.size, -1)
        visible = pos < lens[:, None]
        if window is not None:
            visible &= pos > lens[:, None] - 1 - window
        stale = None
        if not self.clean_tails:
            # Gathered slots that hold no token of the row: the tail of its last block (and
            # copies of it), whatever a previous owner, or nobody, left there.
            src_pos = (src[:, :, None] * bs + np.arange(bs)).reshape(lens.size, -1)
            found = np.flatnonzero(src_pos >= lens[:, None])
            stale = torch.from_numpy(found).to(self.device) if found.size else None
        return _Layout(
            blocks=blocks,
            width=width,
            visible=torch.from_numpy(visible[:, None, None, :]).to(self.device),
            stale=stale,
        )

    def prefill_blocks(self, seq: _PrefillSeq, first_block: int) -> torch.Tensor:
        """Block ids [first_block, ceil(seq_len / BS)) of a prefill sequence (cached)."""
        blocks = seq.blocks.get(first_block)
        if blocks is None:
            num_blocks = -(-seq.seq_len // self.block_size)
            blocks = self.block_tables[seq.seq, first_block:num_blocks].long()
            seq.blocks[first_block] = blocks
        return blocks

    def prefill_mask(self, seq: _PrefillSeq, window: int | None, lo: int) -> torch.Tensor:
        """bool [query_len, seq_len - lo]: causal (and windowed) visibility (cached)."""
        mask = seq.masks.get((window, lo))
        if mask is None:
            n = seq.end - seq.start
            kpos = torch.arange(lo, seq.seq_len, device=self.device)[None, :]
            qpos = torch.arange(seq.seq_len - n, seq.seq_len, device=self.device)[:, None]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            seq.masks[(window, lo)] = mask
        return mask


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    soft_cap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Masked attention with soft-capping and/or sinks, as an explicit fp32 softmax.

    Args:
        q: [B, Hq, Q, D]; k, v: [B, Hk, L, D] (Hq % Hk == 0).
        visible: bool, broadcastable to [B, 1, Q, L]; every row must see at least one key.
        sinks: fp32 [Hq] or None.

    Returns:
        [B, Hq, Q, D] in q.dtype.
    """
    b, hq, nq, d = q.shape
    hk, seq = k.shape[1], k.shape[2]
    group = hq // hk
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]  # [B, Hk, 1, L, D]
    visible = visible.expand(b, 1, nq, seq)
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


def _fp8(cache: torch.Tensor | None) -> bool:
    return cache is not None and cache.dtype in FP8_KV_DTYPES


def _widen(gathered: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Gathered cache rows in the compute dtype (an FP8 cache's rows times its scale)."""
    if gathered.dtype not in FP8_KV_DTYPES:
        return gathered
    return gathered.to(dtype).mul_(scale)


def _decode_run(
    plan: TorchAttentionPlan,
    run: _DecodeRun,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
    window: int | None,
    soft_cap: float | None,
    sinks: torch.Tensor | None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of one decode run: q [T, Hq, D] -> [n, Hq, D] for the run's rows."""
    layout = plan.decode_layout(run, window)
    n, length = run.seq_lens.size, layout.width * plan.block_size
    hq, (hk, d) = q.shape[1], key_cache.shape[2:]
    keys = plan.workspace.gather("k", key_cache, layout.blocks).view(n, length, hk, d)
    values = plan.workspace.gather("v", value_cache, layout.blocks).view(n, length, hk, d)
    keys, values = _widen(keys, k_scale, q.dtype), _widen(values, v_scale, q.dtype)
    if layout.stale is not None:
        keys.view(-1, hk * d).index_fill_(0, layout.stale, 0)
        values.view(-1, hk * d).index_fill_(0, layout.stale, 0)
    qr = q[run.rows]
    if soft_cap or sinks is not None:
        out = _attend(
            qr[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), layout.visible,
            scale, soft_cap, sinks,
        )  # fmt: skip
        return out[:, :, 0]
    # NOTE: query head j reads KV head j // G, so the G query heads of a KV head become G query
    # rows of that head: GQA without expanding keys, and one mask row broadcast over them.
    out = F.scaled_dot_product_attention(
        qr.reshape(n, hk, hq // hk, d),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=layout.visible,
        scale=scale,
    )
    return out.reshape(n, hq, d)


def _prefill_seq(
    plan: TorchAttentionPlan,
    seq: _PrefillSeq,
    q: torch.Tensor,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor | None,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    scale: float,
    window: int | None,
    soft_cap: float | None,
    sinks: torch.Tensor | None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of one sequence's queries: -> [query_len, Hq, D]."""
    n, length = seq.end - seq.start, seq.seq_len
    # NOTE: 4-D inputs: on CPU only those take SDPA's flash kernel (3-D falls back to the
    # math path, several times slower on long prompts).
    qi = q[seq.start : seq.end].transpose(0, 1)[None]
    gqa = q.shape[1] != (key_cache if key_cache is not None else key).shape[-2]
    plain = not soft_cap and sinks is None
    # Keys before the first query's window are never visible: skip them.
    lo = 0 if window is None else max(0, length - n - window + 1)
    if length == n and key is not None:  # no cached prefix: this step's own keys
        ki, vi = key[seq.start + lo : seq.end], value[seq.start + lo : seq.end]
        if _fp8(key_cache):  # as the cache holds them, so every step reads the same keys
            ki = kv_dequantize_ref(kv_quantize_ref(ki, key_cache.dtype, k_scale), k_scale, q.dtype)
            vi = kv_dequantize_ref(kv_quantize_ref(vi, key_cache.dtype, v_scale), v_scale, q.dtype)
    elif key_cache is None:
        raise ValueError("a sequence with a cached prefix needs the KV cache")
    else:
        first = lo // plan.block_size
        blocks = plan.prefill_blocks(seq, first)
        hk, d = key_cache.shape[2:]
        a, b = lo - first * plan.block_size, length - first * plan.block_size
        ki = plan.workspace.gather("k", key_cache, blocks).view(-1, hk, d)[a:b]
        vi = plan.workspace.gather("v", value_cache, blocks).view(-1, hk, d)[a:b]
        ki, vi = _widen(ki, k_scale, q.dtype), _widen(vi, v_scale, q.dtype)
    ki, vi = ki.transpose(0, 1)[None], vi.transpose(0, 1)[None]
    if plain and lo == 0 and length == n and (window is None or length <= window):
        out = F.scaled_dot_product_attention(
            qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        mask = plan.prefill_mask(seq, window, lo)
        if plain:
            out = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        else:
            out = _attend(qi, ki, vi, mask[None, None], scale, soft_cap, sinks)
    return out[0].transpose(0, 1)


def paged_attention_torch(
    q: torch.Tensor,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    plan: TorchAttentionPlan | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal paged attention, torch path; contract of `reference.paged_attention_ref`.

    Args:
        q: [T, Hq, D]; key_cache, value_cache: [NB, BS, Hk, D]; block_tables: int [S, MB];
        seq_lens: int [S]; cu_seqlens_q: int [S + 1]; sinks: fp32 [Hq] or None.
        out: optional [T, Hq, D] buffer.
        plan: this step's `TorchAttentionPlan` (shared by all layers); built here when None.
        key, value: this step's new keys/values [T, Hk, D] (already written to the cache).
            Optional: sequences without a cached prefix then attend over them directly. With
            no cache at all (key_cache None) they are required, and every sequence must be
            all new (seq_len == query_len).
        k_scale, v_scale: an FP8 cache's scales: its rows are read as cache * scale, and
            this step's own keys / values as the cache stores them (rounded to FP8).

    Returns:
        [T, Hq, D]; rows of seq_len-0 sequences are zero; rows not covered by cu_seqlens_q
        are zero (or untouched in `out`).
    """
    if key_cache is None and key is None:
        raise ValueError("paged_attention_torch needs key_cache or this step's key/value")
    if plan is None:
        plan = TorchAttentionPlan(
            seq_lens, cu_seqlens_q, block_tables,
            key_cache.shape[1] if key_cache is not None else None, device=q.device,
        )  # fmt: skip
    if out is None:
        covered = plan.first_row == 0 and plan.end_row == q.shape[0]
        out = torch.empty_like(q) if covered else torch.zeros_like(q)
    for start, end in plan.empty_rows:
        out[start:end] = 0
    features = (sliding_window, soft_cap, sinks, k_scale, v_scale)
    if plan.decode_runs and torch_paged_decode.supports(key_cache, value_cache):
        layout = plan.paged_layout(sliding_window, q.shape[1], *key_cache.shape[2:])
        out[layout.rows] = paged_decode(
            layout, q, key_cache, value_cache, scale, soft_cap=soft_cap, sinks=sinks
        )
    else:
        for run in plan.decode_runs:
            out[run.rows] = _decode_run(plan, run, q, key_cache, value_cache, scale, *features)
    for seq in plan.prefills:
        out[seq.start : seq.end] = _prefill_seq(
            plan, seq, q, key_cache, value_cache, key, value, scale, *features
        )
    return out


def write_kv_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter key/value [T, Hk, D] into [NB, BS, Hk, D] caches at slot_mapping [T] (slot < 0
    skips the token), in place; one index_copy_ per contiguous cache, an indexed assignment
    for any other strides. An FP8 cache stores key / k_scale and value / v_scale
    (`reference.kv_quantize_ref`).

    NOTE: a token written at offset 0 starts its block: the block's other slots are zeroed
    first, so the slots past a sequence's last token never hold what a previous owner of the
    block left there (possibly inf or NaN). That is what `TorchAttentionPlan(clean_tails=True)`
    relies on; it costs one small fill per new block.
    """
    if key_cache.dtype in FP8_KV_DTYPES:
        # NOTE: as bytes: CPU torch has no index_fill_ / index_copy_ for FP8 (0x00 is 0.0).
        key = kv_quantize_ref(key, key_cache.dtype, k_scale).view(torch.uint8)
        value = kv_quantize_ref(value, value_cache.dtype, v_scale).view(torch.uint8)
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    block_size = key_cache.shape[1]
    slots = slot_mapping.long()
    if slots.device.type == "cpu":  # a few dozen indices: numpy beats torch's per-op overhead
        host = slots.numpy()
        if (host < 0).any():
            keep = torch.from_numpy(host >= 0)
            key, value, slots = key[keep], value[keep], slots[keep]
            host = slots.numpy()
        fresh = torch.from_numpy(host[host % block_size == 0] // block_size)
    else:
        if slots.numel() and bool((slots < 0).any()):
            keep = slots >= 0
            key, value, slots = key[keep], value[keep], slots[keep]
        fresh = slots[slots % block_size == 0] // block_size
    if fresh.numel():
        for cache in (key_cache, value_cache):
            rows = _block_rows(cache)
            if rows is not None:  # the whole block: its slot-0 token is written below
                rows.index_fill_(0, fresh.to(rows.device), 0)
            else:
                cache[fresh, 1:] = 0
    for new, cache in ((key, key_cache), (value, value_cache)):
        if cache.is_contiguous():
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new.to(cache.dtype))
        elif _keys_by_slot_last(cache) and slots.shape[0] <= _FLAT_WRITE_MAX_TOKENS:
            # Keys of `torch_paged_decode.new_kv_cache`, stored [NB, Hk, D, BS]: element
            # (h, d) of the token in slot s lies at (s // BS) * Hk*D*BS + (h*D + d) * BS + s % BS.
            # NOTE: one flat index_copy_; the indexed assignment below took ~0.5 ms for the
            # 8 tokens of a decode step (per layer), this ~0.05 ms; for long prefills the
            # index tensor costs more than it saves.
            storage = cache.permute(0, 2, 3, 1)
            per_block = storage[0].numel()
            cols = torch.arange(0, per_block, block_size, device=slots.device)
            idx = ((slots // block_size) * per_block + slots % block_size)[:, None] + cols
            storage.view(-1).index_copy_(0, idx.view(-1), new.reshape(-1).to(cache.dtype))
        else:
            cache[slots // block_size, slots % block_size] = new.to(cache.dtype)


_FLAT_WRITE_MAX_TOKENS = 256
"""Tokens up to which `write_kv_cache_torch` writes slot-last keys with one flat
index_copy_ (measured faster up to a few hundred tokens, slower at 1024)."""


def _keys_by_slot_last(cache: torch.Tensor) -> bool:
    """The cache [NB, BS, Hk, D] is a view of a contiguous [NB, Hk, D, BS] tensor."""
    return cache.permute(0, 2, 3, 1).is_contiguous()


def _block_rows(cache: torch.Tensor) -> torch.Tensor | None:
    """The cache's storage as [NB, block elements] when each block is one contiguous run
    (a contiguous cache, or slot-last keys); else None."""
    if cache.is_contiguous():
        return cache.view(cache.shape[0], -1)
    if _keys_by_slot_last(cache):
        return cache.permute(0, 2, 3, 1).view(cache.shape[0], -1)
    return None
