"""Paged blocks for models whose attention layers all slide (Mistral-style windows): blocks
that fall wholly out of the window go back to the pool while the request runs.

A query at position p reads keys in (p - window, p]. Before a running request computes from
position c, blocks that end at or before c - window are never read again (one token of
margin: a grammar deferral recomputes position c - 1). They are released in order from the
front of the request's block table; `req.num_skipped_blocks` counts them, and the workers keep
the stale ids in their tables, masked out by the window (a reused block holds another
request's finite keys, which get weight zero). With the prefix cache on, a released block keeps
its hash (it is already registered: it is full of computed tokens) and stays a cache hit until
it is evicted.
"""

from __future__ import annotations

from .block_pool import KVBlock
from .paged_blocks import PagedBlockManager
from .request import Request


class SlidingWindowBlockManager(PagedBlockManager):
    def __init__(
        self, num_blocks: int, block_size: int, sliding_window: int, enable_caching: bool = True
    ) -> None:
        super().__init__(num_blocks, block_size, enable_caching)
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.num_released = 0
        """Blocks given back early so far (a counter for tests and stats)."""

    def release_out_of_window(self, req: Request) -> None:
        """Give back the request's blocks that no future query of it reads."""
        dead = max(req.num_computed_tokens - self.sliding_window, 0) // self.block_size
        if self.enable_caching:
            dead = min(dead, req.num_cached_blocks)  # NOTE: registered first, then released
        if dead <= req.num_skipped_blocks:
            return
        stale = req.blocks[req.num_skipped_blocks : dead]
        self.pool.release(list(reversed(stale)))
        self.num_released += len(stale)
        req.num_skipped_blocks = dead

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> list[KVBlock] | None:
        if req.num_computed_tokens and not computed_blocks:
            self.release_out_of_window(req)
        return super().allocate_slots(req, num_new_tokens, computed_blocks)

    def free(self, req: Request) -> None:
        self.pool.release(list(reversed(req.blocks[req.num_skipped_blocks :])))
        req.blocks = []
        req.num_cached_blocks = 0
        req.num_skipped_blocks = 0
