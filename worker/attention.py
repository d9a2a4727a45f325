"""Paged attention of the worker: per-step metadata, the Attention layer, and the backends.

Backends write a layer's new keys/values into its cache and attend through
`splitserve.kernels.dispatch`: the Triton kernels (CUDA) or the torch path (CPU). The metadata
is built once per step and every layer reuses it, as well as whatever the backend derives from
it once per step (the torch path's `TorchAttentionPlan`).

KV cache per layer: key and value tensors [num_blocks, block_size, num_kv_heads, head_dim];
token at position p of a sequence lives at slot block_table[p // block_size] * block_size +
p % block_size. With `--kv-cache-dtype fp8` a layer's cache is FP8 and holds keys / k_scale
and values / v_scale (the layer's two per-tensor scales, from the checkpoint or 1.0); the
backends read it back times the scale, so attention sees the same rounded keys on every step.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from splitserve.kernels import dispatch, torch_paged_decode
from splitserve.kernels._checks import FP8_KV_DTYPES
from splitserve.kernels.torch_attention import TorchAttentionPlan, Workspace
from splitserve.worker.cache_spec import AttentionSpec

PAGED_DECODE_ENV = "SPLITSERVE_CPU_PAGED_DECODE"
"""Set to 0 to make the torch backend allocate plain caches, so its decodes take the older
gather path (each layer copies the rows' blocks, then SDPA); for A/B benchmarks only."""


@dataclass(slots=True)
class AttentionMetadata:
    """Everything the attention layers need for one step, shared by all layers."""

    num_tokens: int
    """Tokens in the step."""
    slot_mapping: torch.Tensor | None
    """int64 [num_tokens] cache slot of each new token (< 0: write nothing); None without a
    cache (profiling)."""
    seq_lens: torch.Tensor
    """int32 [S] context length of each sequence after this step (0: padding, reads nothing)."""
    query_start_loc: torch.Tensor
    """int32 [S + 1] offsets of each sequence's tokens in the step."""
    block_tables: torch.Tensor | None = None
    """int32 [S, max_blocks] block tables (entries past a sequence's blocks are ignored); None
    without a cache."""
    max_query_len: int = 0
    """Longest query this step (1 means decodes only)."""
    max_seq_len: int = 0
    """Bound on seq_lens (the real maximum, or a fixed cap under CUDA graphs)."""
    state_slots: torch.Tensor | None = None
    """int64 [S] recurrent-state slot of each sequence (models with state-space layers);
    None without a state cache (profiling) or without such layers."""
    has_initial_state: torch.Tensor | None = None
    """bool [S] with state_slots: the sequence continues from the state in its slot (False:
    its first tokens, the state starts from zeros)."""
    extras: dict = field(default_factory=dict)
    """Backend-owned per-step state built on first use (cleared by `prepare`)."""


class AttentionBackend:
    """The seam for attention implementations: write new K/V to the cache, then attend."""

    name = "base"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Reset per-step state (once per step, before the layers run)."""
        meta.extras.clear()

    def new_kv_cache(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed key and value caches of one layer, shaped [NB, BS, Hk, D] (the memory layout
        underneath is the backend's choice)."""
        return (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] (views may be strided) -> [T, Hq * D]; sinks: fp32
        [Hq] attention-sink logits (gpt-oss) or None."""
        key_cache, value_cache = layer.kv_cache if layer.kv_cache is not None else (None, None)
        if key_cache is not None and meta.slot_mapping is not None:
            dispatch.write_kv_cache(
                k, v, key_cache, value_cache, meta.slot_mapping, backend=self.name,
                k_scale=layer.k_scale, v_scale=layer.v_scale,
            )  # fmt: skip
        out = dispatch.paged_attention(
            q,
            key_cache,
            value_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            layer.scale,
            sliding_window=layer.sliding_window,
            sinks=sinks,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            backend=self.name,
            plan=self.torch_plan(meta, key_cache),
            key=k,
            value=v,
            k_scale=layer.k_scale,
            v_scale=layer.v_scale,
        )
        return out.view(q.shape[0], -1)

    def torch_plan(
        self, meta: AttentionMetadata, key_cache: torch.Tensor | None
    ) -> TorchAttentionPlan | None:
        """The torch path's plan of this step, when this backend runs the torch path."""
        return None


class TorchAttentionBackend(AttentionBackend):
    """The torch path (CPU): decodes read the cache in place (`torch_paged_decode`, whose key
    layout this backend allocates), prefills go per sequence, and a cache-free mode serves
    profiling forwards. Its gather buffers persist across steps."""

    name = "torch"

    def __init__(self) -> None:
        self._workspace = Workspace()
        self.paged_decode = os.environ.get(PAGED_DECODE_ENV, "1") != "0"

    def new_kv_cache(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.paged_decode or dtype in FP8_KV_DTYPES:
            # NOTE: the in-place decode multiplies fp32 caches; FP8 caches are gathered and
            # widened per layer instead (slower, for the memory).
            return super().new_kv_cache(shape, dtype, device)
        return torch_paged_decode.new_kv_cache(*shape, dtype=dtype, device=device)

    def torch_plan(
        self, meta: AttentionMetadata, key_cache: torch.Tensor | None
    ) -> TorchAttentionPlan:
        plan = meta.extras.get("torch_plan")
        if plan is None:
            plan = TorchAttentionPlan(
                meta.seq_lens,
                meta.query_start_loc,
                meta.block_tables if key_cache is not None else None,
                key_cache.shape[1] if key_cache is not None else None,
                workspace=self._workspace,
                device=meta.seq_lens.device,
                # This backend writes the cache only through the torch path's KV write.
                clean_tails=True,
            )
            meta.extras["torch_plan"] = plan
        return plan


class TritonAttentionBackend(AttentionBackend):
    """`splitserve.kernels`' Triton kernels: the KV write, then varlen paged attention over
    the whole step (the split-KV decode kernel when every query is one token). Graph-safe:
    no host syncs when the metadata carries max_query_len and max_seq_len."""

    name = "triton"

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if layer.kv_cache is None:
            raise RuntimeError("the triton backend needs a KV cache; profile with 'torch'")
        return super().forward(layer, q, k, v, meta, sinks)


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
    return _BACKENDS[dispatch.select_attention_backend(name, device)]()


@dataclass(slots=True)
class _ForwardContext:
    backend: AttentionBackend
    metadata: AttentionMetadata


_LOCAL = threading.local()
"""Per thread: the step being computed (runners on different threads do not mix)."""


def current_metadata() -> AttentionMetadata:
    """The step being computed on this thread (layers other than Attention read it too)."""
    context = getattr(_LOCAL, "context", None)
    if context is None:
        raise RuntimeError("a cache-reading layer was called outside forward_context()")
    return context.metadata


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
        self.kv_cache_dtype: torch.dtype | None = None
        """The cache's dtype when it is not the model's (an FP8 --kv-cache-dtype)."""
        self.k_scale = 1.0
        """An FP8 cache holds keys / k_scale (the checkpoint's k_scale, or 1.0)."""
        self.v_scale = 1.0

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return self.kv_cache_dtype or model_dtype

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> AttentionSpec:
        """Paged blocks of this layer's keys and values (windowed when it slides)."""
        return AttentionSpec(
            self.layer_idx,
            block_size,
            self.num_kv_heads,
            self.head_dim,
            self.cache_dtype(dtype),
            self.sliding_window,
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """sinks: fp32 [Hq], one extra softmax logit per head that attends to no value."""
        context = getattr(_LOCAL, "context", None)
        if context is None:
            raise RuntimeError("Attention called outside forward_context()")
        return context.backend.forward(self, q, k, v, context.metadata, sinks)
