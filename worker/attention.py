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
from collections.abc import Iterator
from dataclasses import dataclass, field

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
    extras: dict = field(default_factory=dict)
    """Backend-owned per-step state built by `AttentionBackend.prepare`."""


class AttentionBackend:
    """The seam for attention implementations: write new K/V to the cache, then attend."""

    name = "base"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Precompute per-step state (once per step, before the layers run)."""

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq * D], k/v [T, Hk * D] -> [T, Hq * D]."""
        raise NotImplementedError


class TorchAttentionBackend(AttentionBackend):
    """Plain torch: one batched SDPA for all decodes, one SDPA per prefill sequence."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        meta.extras.clear()
        if meta.num_decodes:
            bs = meta.decode_block_tables
            meta.extras["decode_blocks"] = bs.reshape(-1)

    def _decode_mask(self, meta: AttentionMetadata, block_size: int,
                     window: int | None) -> torch.Tensor:
        key = ("decode_mask", block_size, window)
        mask = meta.extras.get(key)
        if mask is None:
            seq_lens = meta.decode_seq_lens[:, None]
            length = meta.decode_block_tables.shape[1] * block_size
            pos = torch.arange(length, device=seq_lens.device)[None, :]
            mask = pos < seq_lens
            if window is not None:
                mask &= pos > seq_lens - 1 - window
            mask = mask[:, None, None, :]
            meta.extras[key] = mask
        return mask

    def _prefill_mask(self, meta: AttentionMetadata, i: int, seq: PrefillSeq,
                      window: int | None) -> torch.Tensor:
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

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        hq, hk, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        num_tokens = q.shape[0]
        k = k.view(num_tokens, hk, d)
        v = v.view(num_tokens, hk, d)
        key_cache, value_cache = layer.kv_cache if layer.kv_cache is not None else (None, None)
        if key_cache is not None and meta.slot_mapping is not None:
            write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(layer, q[:nd], key_cache, value_cache, meta)
        for i, seq in enumerate(meta.prefills):
            s, n = seq.query_start, seq.query_len
            qi = q[s:s + n].view(n, hq, d).transpose(0, 1)
            window = layer.sliding_window
            if seq.block_ids is None and (window is None or seq.seq_len <= window):
                # No cached prefix: attend over this step's own keys, causally.
                ki, vi = k[s:s + n].transpose(0, 1), v[s:s + n].transpose(0, 1)
                oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True,
                                                    scale=layer.scale, enable_gqa=hq != hk)
            else:
                ki, vi = self._gather_seq(key_cache, value_cache, seq, k[s:s + n], v[s:s + n])
                mask = self._prefill_mask(meta, i, seq, window)
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask,
                                                    scale=layer.scale, enable_gqa=hq != hk)
            out[s:s + n] = oi.transpose(0, 1).reshape(n, hq * d)
        return out

    def _decode(self, layer: Attention, q: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        nd = q.shape[0]
        hq, hk, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        block_size = key_cache.shape[1]
        blocks = meta.extras["decode_blocks"]
        length = meta.decode_block_tables.shape[1] * block_size
        keys = key_cache.index_select(0, blocks).view(nd, length, hk, d).transpose(1, 2)
        values = value_cache.index_select(0, blocks).view(nd, length, hk, d).transpose(1, 2)
        # NOTE: query heads group by KV head (head j reads KV head j // G), so viewing the G
        # query heads of a KV head as G query rows handles GQA without expanding the keys.
        qg = q.view(nd, hk, hq // hk, d)
        mask = self._decode_mask(meta, block_size, layer.sliding_window)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=layer.scale)
        return out.reshape(nd, hq * d)

    @staticmethod
    def _gather_seq(key_cache: torch.Tensor | None, value_cache: torch.Tensor | None,
                    seq: PrefillSeq, k_new: torch.Tensor, v_new: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if seq.block_ids is None or key_cache is None:  # the whole context is this step's
            return k_new.transpose(0, 1), v_new.transpose(0, 1)
        hk, d = key_cache.shape[2], key_cache.shape[3]
        ki = key_cache.index_select(0, seq.block_ids).view(-1, hk, d)[:seq.seq_len]
        vi = value_cache.index_select(0, seq.block_ids).view(-1, hk, d)[:seq.seq_len]
        return ki.transpose(0, 1), vi.transpose(0, 1)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter k/v [T, Hk, D] into the caches [NB, BS, Hk, D] at slot_mapping [T] (int64)."""
    hk, d = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, hk, d).index_copy_(0, slot_mapping, k.to(key_cache.dtype))
    value_cache.view(-1, hk, d).index_copy_(0, slot_mapping, v.to(value_cache.dtype))


_BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchAttentionBackend,
}


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """Pick the backend for `attention_backend` ("auto", "torch", "triton") on `device`."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and "triton" in _BACKENDS else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available; available: "
                         f"{', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()


@dataclass(slots=True)
class _ForwardContext:
    backend: AttentionBackend
    metadata: AttentionMetadata


_CONTEXT: _ForwardContext | None = None


@contextlib.contextmanager
def forward_context(backend: AttentionBackend, meta: AttentionMetadata) -> Iterator[None]:
    """Make `meta` the step every Attention layer reads while a forward runs."""
    global _CONTEXT
    backend.prepare(meta)
    previous, _CONTEXT = _CONTEXT, _ForwardContext(backend, meta)
    try:
        yield
    finally:
        _CONTEXT = previous


class Attention(nn.Module):
    """Paged attention of one layer; holds a reference to that layer's KV cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 layer_idx: int, sliding_window: int | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if _CONTEXT is None:
            raise RuntimeError("Attention called outside forward_context()")
        return _CONTEXT.backend.forward(self, q, k, v, _CONTEXT.metadata)
