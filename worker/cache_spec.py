"""What each layer keeps per request between steps, as reported in Describe.

A layer with a cache declares it through `cache_spec(block_size, dtype)`: `Attention`
returns a full-attention or sliding-window spec (paged blocks), a state-space mixer a
recurrent-state spec (one fixed-size state per request: conv state and SSM state). The
scheduler's cache coordinator runs one manager per kind; this rank allocates tensors per spec
(`kv_cache.KVCache` for the attention kinds, `state_cache.StateCache` for recurrent state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from splitserve.protos import worker_pb2

Kind = worker_pb2.LayerCacheSpec.Kind


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """Paged keys and values; `sliding_window` set: only that many last tokens are read."""

    layer_idx: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    sliding_window: int | None = None

    @property
    def page_bytes(self) -> int:
        """One block's keys and values."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * _itemsize(self.dtype)

    def to_proto(self) -> worker_pb2.LayerCacheSpec:
        kind = Kind.KIND_SLIDING_WINDOW if self.sliding_window else Kind.KIND_FULL_ATTENTION
        return worker_pb2.LayerCacheSpec(
            layer_idx=self.layer_idx,
            kind=kind,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            sliding_window=self.sliding_window or 0,
            dtype=dtype_name(self.dtype),
            page_bytes=self.page_bytes,
        )


@dataclass(frozen=True, slots=True)
class RecurrentStateSpec:
    """One request's state of a state-space layer: conv state and SSM state."""

    layer_idx: int
    conv_state_shape: tuple[int, ...]
    """[conv channels, kernel - 1]: the last inputs of the depthwise causal convolution."""
    ssm_state_shape: tuple[int, ...]
    """[heads, head_dim, state size]."""
    dtype: torch.dtype

    @property
    def page_bytes(self) -> int:
        """One request's conv and SSM state."""
        elements = math.prod(self.conv_state_shape) + math.prod(self.ssm_state_shape)
        return elements * _itemsize(self.dtype)

    def to_proto(self) -> worker_pb2.LayerCacheSpec:
        return worker_pb2.LayerCacheSpec(
            layer_idx=self.layer_idx,
            kind=Kind.KIND_RECURRENT_STATE,
            conv_state_shape=list(self.conv_state_shape),
            ssm_state_shape=list(self.ssm_state_shape),
            dtype=dtype_name(self.dtype),
            page_bytes=self.page_bytes,
        )


CacheSpec = AttentionSpec | RecurrentStateSpec


def cache_layers(model: nn.Module) -> list[nn.Module]:
    """This rank's modules that keep a cache, in layer order."""
    return sorted(
        (m for m in model.modules() if callable(getattr(m, "cache_spec", None))),
        key=lambda m: m.layer_idx,
    )


def layer_cache_specs(model: nn.Module, block_size: int, dtype: torch.dtype) -> list[CacheSpec]:
    return [m.cache_spec(block_size, dtype) for m in cache_layers(model)]


def bytes_per_block(specs: list[CacheSpec]) -> int:
    return sum(s.page_bytes for s in specs if isinstance(s, AttentionSpec))
