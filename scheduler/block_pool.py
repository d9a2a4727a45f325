"""KV blocks: reference counts, the free queue (LRU) and the prefix-cache hash map.

A block with ref_cnt 0 sits in the free queue. If it holds a full block of known tokens it
keeps its hash, so a later request with the same prefix can take it back; when the pool
needs a fresh block it evicts the least recently freed one and drops its hash.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    """Chained SHA-256 of this block's tokens and every block before it; None while partial."""


class BlockPool:
    """Owns every KV block; the KV-cache manager asks it for blocks and gives them back."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # NOTE: insertion order is eviction order: the front was freed longest ago.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[KVBlock]:
        """Take n blocks off the free queue (evicting cached ones), each with ref_cnt 1."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def acquire(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks found by lookup (prefix-cache hit)."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop one reference on each block; blocks reaching 0 join the free queue's tail.

        Callers pass a request's blocks tail first, so its last (least shared) blocks are
        evicted before its prefix.
        """
        for b in blocks:
            b.ref_cnt -= 1
            if b.ref_cnt < 0:
                raise RuntimeError(f"block {b.block_id} released more often than taken")
            if b.ref_cnt == 0:
                self._free[b.block_id] = b

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Record that `block` holds the full block identified by `block_hash`."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        # NOTE: an identical block cached earlier stays the lookup target while someone holds
        # it (two requests computed the same prefix in the same step); a free one gives way,
        # since it is evicted first (a hit cut back, as recurrent models do without a state
        # snapshot, computes its blocks again).
        current = self._cached.get(block_hash)
        if current is None or current.ref_cnt == 0:
            self._cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for b in self.blocks:
            b.block_hash = None
        self._cached.clear()
        return True
