"""Paged attention: per-step metadata, the Attention layer, and the torch backend.

A step's tokens are laid out decode-first: the first `num_decodes` tokens are single-token
queries, one per sequence; the prefill (or chunked-prefill) sequences follow, each a contiguous
run of tokens. The metadata is built once per step; every layer reuses it, and the backend may
precompute what it needs (masks, gather indices) once in `prepare`.

KV cache per layer: key and value tensors [num_blocks, block_size, num_kv_heads, head_dim];
token at position p of a sequence lives at slot block_table[p // block_size] * block_size +
p % block_size.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefillSeq:
    """One sequence with a multi-token query this step."""

    query_start: int
    """Offset of its first token in the step's token batch."""
    query_len: int
    """Tokens it computes this step."""
    seq_len: int
    """Tokens in its context after this step (cached prefix + query)."""
    block_ids: torch.Tensor | None
    """Blocks covering seq_len, when keys must be read back from the cache (a cached prefix)."""


@dataclass(slots=True)
class AttentionMetadata:
    """Everything the attention layers need for one step, shared by all layers."""

    num_tokens: int
    """Tokens in the step."""
    slot_mapping: torch.Tensor | None
    """int64 [num_tokens] cache slot of each new token; None when no cache exists (profiling)."""
    num_decodes: int
    """Sequences with a one-token query; their tokens come first."""
    decode_seq_lens: torch.Tensor | None = None
    """int64 [num_decodes] context length (including the new token) of each decode sequence."""
    decode_block_tables: torch.Tensor | None = None
    """int64 [num_decodes, max_blocks] block tables, padded (padding is masked out)."""
    prefills: list[PrefillSeq] = field(default_factory=list)
    """The multi-token sequences, in token order."""
    block_tables: torch.Tensor | None = None
    """int32 [S, max_blocks] block tables of all sequences, in token order (varlen kernels)."""
    seq_lens: torch.Tensor | None = None
    """int32 [S] context length of each sequence after this step."""
    query_start_loc: torch.Tensor | None = None
    """int32 [S + 1] offsets of each sequence's tokens in the step."""
    max_query_len: int = 0
    """Longest query this step (1 means decodes only)."""
    max_seq_len: int = 0
    """Longest context this step."""
    extras: dict = field(default_factory=dict)
    """Backend-owned per-step state built by `AttentionBackend.prepare`."""


class AttentionBackend:
    """The seam for attention implementations: write new K/V to the cache, then attend."""

    name = "base"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Precompute per-step state (once per step, before the layers run)."""

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] (views may be strided) -> [T, Hq * D]."""
        raise NotImplementedError


@dataclass(slots=True)
class _DecodeGroup:
    """A run of decode sequences [start, end) padded to `width` blocks."""

    start: int
    end: int
    width: int
    blocks: torch.Tensor
    seq_lens: torch.Tensor


def _split_runs(num_blocks: np.ndarray, start: int, end: int, depth: int) -> list[tuple[int, int]]:
    """Split [start, end) where padding every row to its run's widest row saves the most."""
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


class TorchAttentionBackend(AttentionBackend):
    """Plain torch: one batched SDPA for all decodes, one SDPA per prefill sequence.

    Keys and values are gathered out of the paged cache into scratch buffers that persist
    across layers and steps: fresh multi-megabyte tensors every layer cost page faults that
    can take longer than the attention itself.
    """

    name = "torch"

    def __init__(self) -> None:
        self._scratch: dict[str, torch.Tensor] = {}

    def _gather(self, name: str, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """cache[blocks] ([n, BS, Hk, D]) written into a reused buffer."""
        n = blocks.shape[0]
        buf = self._scratch.get(name)
        if (
            buf is None
            or buf.shape[0] < n
            or buf.shape[1:] != cache.shape[1:]
            or buf.dtype != cache.dtype
            or buf.device != cache.device
        ):
            capacity = max(n + n // 4, buf.shape[0] if buf is not None else 0)
            buf = torch.empty((capacity, *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
            self._scratch[name] = buf
        return torch.index_select(cache, 0, blocks, out=buf[:n])

    def prepare(self, meta: AttentionMetadata) -> None:
        meta.extras.clear()

    def _decode_groups(self, meta: AttentionMetadata, block_size: int) -> list[_DecodeGroup]:
        """Split the decodes into a few runs of similar length, each padded only to its own
        longest context (the runner sorts decodes by length), so short sequences do not pay
        for the longest one's blocks."""
        groups = meta.extras.get("decode_groups")
        if groups is None:
            lens = meta.decode_seq_lens.cpu().numpy()
            num_blocks = -(-lens // block_size)
            groups = []
            for start, end in _split_runs(num_blocks, 0, len(lens), depth=2):
                width = int(num_blocks[start:end].max())
                table = meta.decode_block_tables[start:end, :width]
                groups.append(
                    _DecodeGroup(
                        start, end, width, table.reshape(-1), meta.decode_seq_lens[start:end]
                    )
                )
            meta.extras["decode_groups"] = groups
        return groups

    @staticmethod
    def _decode_mask(
        meta: AttentionMetadata,
        index: int,
        group: _DecodeGroup,
        block_size: int,
        window: int | None,
    ) -> torch.Tensor:
        key = ("decode_mask", index, window)
        mask = meta.extras.get(key)
        if mask is None:
            seq_lens = group.seq_lens[:, None]
            pos = torch.arange(group.width * block_size, device=seq_lens.device)[None, :]
            mask = pos < seq_lens
            if window is not None:
                mask &= pos > seq_lens - 1 - window
            mask = mask[:, None, None, :]
            meta.extras[key] = mask
        return mask

    def _prefill_mask(
        self, meta: AttentionMetadata, i: int, seq: PrefillSeq, window: int | None
    ) -> torch.Tensor:
        key = ("prefill_mask", i, window)
        mask = meta.extras.get(key)
        if mask is None:
            device = meta.slot_mapping.device if meta.slot_mapping is not None else None
            kpos = torch.arange(seq.seq_len, device=device)[None, :]
            qpos = torch.arange(seq.seq_len - seq.query_len, seq.seq_len, device=device)[:, None]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            meta.extras[key] = mask
        return mask

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hq, hk, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        num_tokens = q.shape[0]
        key_cache, value_cache = layer.kv_cache if layer.kv_cache is not None else (None, None)
        if key_cache is not None and meta.slot_mapping is not None:
            write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        out = q.new_empty((num_tokens, hq * d))
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(layer, q[:nd], key_cache, value_cache, meta)
        gqa = hq != hk
        for i, seq in enumerate(meta.prefills):
            s, n = seq.query_start, seq.query_len
            # NOTE: 4-D inputs: on CPU only those take SDPA's flash kernel (3-D falls back
            # to the math path, several times slower on long prompts).
            qi = q[s : s + n].transpose(0, 1)[None]
            window = layer.sliding_window
            if seq.block_ids is None and (window is None or seq.seq_len <= window):
                # No cached prefix: attend over this step's own keys, causally.
                ki, vi = k[s : s + n].transpose(0, 1)[None], v[s : s + n].transpose(0, 1)[None]
                oi = F.scaled_dot_product_attention(
                    qi, ki, vi, is_causal=True, scale=layer.scale, enable_gqa=gqa
                )
            else:
                ki, vi = self._gather_seq(key_cache, value_cache, seq, k[s : s + n], v[s : s + n])
                mask = self._prefill_mask(meta, i, seq, window)
                oi = F.scaled_dot_product_attention(
                    qi, ki[None], vi[None], attn_mask=mask, scale=layer.scale, enable_gqa=gqa
                )
            out[s : s + n] = oi[0].transpose(0, 1).reshape(n, hq * d)
        return out

    def _decode(
        self,
        layer: Attention,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hq, hk, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        block_size = key_cache.shape[1]
        out = q.new_empty((q.shape[0], hq * d))
        for i, group in enumerate(self._decode_groups(meta, block_size)):
            n, length = group.end - group.start, group.width * block_size
            keys = self._gather("k", key_cache, group.blocks).view(n, length, hk, d)
            values = self._gather("v", value_cache, group.blocks).view(n, length, hk, d)
            # NOTE: query heads group by KV head (head j reads KV head j // G), so viewing the
            # G query heads of a KV head as G query rows handles GQA without expanding keys.
            qg = q[group.start : group.end].reshape(n, hk, hq // hk, d)
            mask = self._decode_mask(meta, i, group, block_size, layer.sliding_window)
            o = F.scaled_dot_product_attention(
                qg, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=layer.scale
            )
            out[group.start : group.end] = o.reshape(n, hq * d)
        return out

    def _gather_seq(
        self,
        key_cache: torch.Tensor | None,
        value_cache: torch.Tensor | None,
        seq: PrefillSeq,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if seq.block_ids is None or key_cache is None:  # the whole context is this step's
            return k_new.transpose(0, 1), v_new.transpose(0, 1)
        hk, d = key_cache.shape[2], key_cache.shape[3]
        ki = self._gather("k", key_cache, seq.block_ids).view(-1, hk, d)[: seq.seq_len]
        vi = self._gather("v", value_cache, seq.block_ids).view(-1, hk, d)[: seq.seq_len]
        return ki.transpose(0, 1), vi.transpose(0, 1)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k/v [T, Hk, D] into the caches [NB, BS, Hk, D] at slot_mapping [T] (int64)."""
    hk, d = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, hk, d).index_copy_(0, slot_mapping, k.to(key_cache.dtype))
    value_cache.view(-1, hk, d).index_copy_(0, slot_mapping, v.to(value_cache.dtype))


class TritonAttentionBackend(AttentionBackend):
    """`splitserve.kernels`: Triton KV write and varlen paged attention over the whole step
    (the split-KV decode kernel when every query is one token)."""

    name = "triton"

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        from splitserve.kernels import dispatch

        key_cache, value_cache = layer.kv_cache
        dispatch.write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping, backend="triton")
        out = dispatch.paged_attention(
            q,
            key_cache,
            value_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            layer.scale,
            sliding_window=layer.sliding_window,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            backend="triton",
        )
        return out.view(q.shape[0], -1)


_BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchAttentionBackend,
    "triton": TritonAttentionBackend,
}


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """Pick the backend for `attention_backend` ("auto", "torch", "triton") on `device`.

    `splitserve.kernels.dispatch.select_attention_backend` decides what can run where
    (auto: triton on CUDA when installed, torch elsewhere).
    """
    if name not in ("auto", *_BACKENDS):
        raise ValueError(
            f"attention backend {name!r} is not available; available: "
            f"auto, {', '.join(sorted(_BACKENDS))}"
        )
    from splitserve.kernels.dispatch import select_attention_backend

    return _BACKENDS[select_attention_backend(name, device)]()


@dataclass(slots=True)
class _ForwardContext:
    backend: AttentionBackend
    metadata: AttentionMetadata


_LOCAL = threading.local()
"""Per thread: the step being computed (runners on different threads do not mix)."""


@contextlib.contextmanager
def forward_context(backend: AttentionBackend, meta: AttentionMetadata) -> Iterator[None]:
    """Make `meta` the step every Attention layer reads while a forward runs."""
    backend.prepare(meta)
    previous = getattr(_LOCAL, "context", None)
    _LOCAL.context = _ForwardContext(backend, meta)
    try:
        yield
    finally:
        _LOCAL.context = previous


class Attention(nn.Module):
    """Paged attention of one layer; holds a reference to that layer's KV cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        layer_idx: int,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        context = getattr(_LOCAL, "context", None)
        if context is None:
            raise RuntimeError("Attention called outside forward_context()")
        return context.backend.forward(self, q, k, v, context.metadata)
