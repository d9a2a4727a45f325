"""The paged KV cache of this rank: sizing, allocation, and binding to the attention layers.

Shape per layer: key and value tensors [num_blocks, block_size, num_kv_heads, head_dim]. The
attention backend allocates them and picks the memory layout underneath: contiguous for the
Triton kernels, keys stored [num_blocks, num_kv_heads, head_dim, block_size] for the CPU torch
path's in-place decode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from splitserve.worker.attention import Attention
from splitserve.worker.config import DEFAULT_CPU_KV_BYTES, WorkerConfig

logger = logging.getLogger(__name__)

CPU_MEMORY_SHARE = 0.5
"""Most of the machine's available memory the default CPU KV cache may take."""


def attention_layers(model: nn.Module) -> list[Attention]:
    """This rank's Attention modules, in layer order."""
    return sorted(
        (m for m in model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_idx
    )


def bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all of this rank's layers (keys and values)."""
    return sum(
        2 * block_size * a.num_kv_heads * a.head_dim * a.cache_dtype(dtype).itemsize
        for a in attention_layers(model)
    )


def _available_cpu_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def available_kv_bytes(
    config: WorkerConfig,
    device: torch.device,
    profile: Callable[[], int] | None = None,
    reserved: int = 0,
) -> int:
    """Bytes this rank can give to the KV cache.

    CPU: `kv_cache_memory`, or 2 GiB capped to half the available memory. CUDA:
    gpu_memory_utilization * total - peak memory of `profile` (weights + a forward of
    max_num_batched_tokens, which `profile` runs and returns the peak of) - `reserved`, the
    memory kept outside that peak for good: the CUDA graphs' pool and static buffers, which the
    runner measures with a trial capture before the cache exists and captures for real after
    it is allocated.
    """
    if device.type != "cuda":
        if config.kv_cache_memory is not None:
            return int(config.kv_cache_memory)
        free = _available_cpu_memory()
        cap = int(free * CPU_MEMORY_SHARE) if free else DEFAULT_CPU_KV_BYTES
        return min(DEFAULT_CPU_KV_BYTES, cap)
    total = torch.cuda.get_device_properties(device).total_memory
    peak = profile() if profile is not None else torch.cuda.max_memory_allocated(device)
    budget = int(config.gpu_memory_utilization * total) - peak - reserved
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache: gpu_memory_utilization "
            f"{config.gpu_memory_utilization} of {total} bytes is {budget + peak + reserved}, "
            f"the model with activations peaks at {peak} and CUDA graphs hold {reserved}"
        )
    return budget


class KVCache:
    """Key and value tensors for every layer of this rank."""

    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        allocate: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """`allocate(shape, dtype, device)` returns one layer's zeroed (key, value) caches
        (an attention backend's `new_kv_cache`); None allocates contiguous zeros."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers = attention_layers(model)
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.layers:
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            layer_dtype = layer.cache_dtype(dtype)
            # NOTE: zeros, not empty: padded and stale slots are masked, but a NaN there
            # would still poison the attention output (0 * NaN).
            if allocate is None:
                key = torch.zeros(shape, dtype=layer_dtype, device=device)
                value = torch.zeros(shape, dtype=layer_dtype, device=device)
            else:
                key, value = allocate(shape, layer_dtype, device)
            self.caches.append((key, value))
        self.bind()

    def bind(self) -> None:
        """Point each Attention layer at its cache."""
        for layer, cache in zip(self.layers, self.caches, strict=True):
            layer.kv_cache = cache

    def unbind(self) -> None:
        """Detach the caches from the layers (before freeing them)."""
        for layer in self.layers:
            layer.kv_cache = None

    @property
    def nbytes(self) -> int:
        """Bytes held by all caches."""
        return sum(k.nbytes + v.nbytes for k, v in self.caches)
