"""Paged attention blocks of each request on top of the block pool: prefix lookup, block
allocation, freeing. One of the managers the KV-cache coordinator (`kv_cache_manager`) drives."""

from __future__ import annotations

from .block_pool import BlockPool, KVBlock
from .prefix_cache import extend_block_hashes
from .request import Request


class PagedBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.prefix_queries = 0
        """Prompt tokens looked up in the prefix cache."""
        self.prefix_hits = 0
        """Prompt tokens found there."""

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _extra_key(self, req: Request) -> bytes:
        if not req.lora_name:
            return b""
        # NOTE: the load number keeps a reloaded adapter (new weights) off the old load's KV.
        return req.lora_name.encode() + b"\x00" + req.lora_int_id.to_bytes(8, "little")

    def _extend_hashes(self, req: Request, tokens: list[int]) -> None:
        extend_block_hashes(
            req.block_hashes,
            tokens,
            self.block_size,
            self._extra_key(req),
            req.cache_salt.encode(),
            req.mm_spans,
        )

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of a request with no blocks, and its length in tokens.

        At least one token is always left to compute, so the last block read from the cache
        is one the request will not write into.
        """
        if not self.enable_caching:
            return [], 0
        tokens = req.all_token_ids()
        self._extend_hashes(req, tokens)
        max_blocks = (len(tokens) - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in req.block_hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Count one admitted request's prefix-cache lookup (in tokens)."""
        if self.enable_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> list[KVBlock] | None:
        """Make room for `num_new_tokens` more tokens; None when the pool is too small.

        `computed_blocks` (prefix-cache hits for a request with no blocks yet) are taken
        first; they count against the free queue when nobody else holds them.
        """
        computed_blocks = computed_blocks or []
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        have = len(req.blocks) + len(computed_blocks)
        need = self.blocks_for(num_computed + num_new_tokens) - have
        reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if not self.pool.can_allocate(max(need, 0) + reclaimed):
            return None
        if computed_blocks:
            self.pool.acquire(computed_blocks)
            req.blocks.extend(computed_blocks)
            req.num_cached_blocks = len(req.blocks)
        new = self.pool.allocate(need) if need > 0 else []
        req.blocks.extend(new)
        return new

    def cache_blocks(self, req: Request) -> None:
        """Register the request's blocks that are full of known, computed tokens."""
        if not self.enable_caching:
            return
        num_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        if num_full <= req.num_cached_blocks:
            return
        if len(req.block_hashes) < num_full:
            self._extend_hashes(req, req.all_token_ids())
        for i in range(req.num_cached_blocks, num_full):
            self.pool.cache_block(req.blocks[i], req.block_hashes[i])
        req.num_cached_blocks = num_full

    def free(self, req: Request) -> None:
        """Give back every block of the request, tail first (evicted before the prefix)."""
        self.pool.release(list(reversed(req.blocks)))
        req.blocks = []
        req.num_cached_blocks = 0
