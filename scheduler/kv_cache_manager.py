"""The KV-cache coordinator: one manager per kind of layer cache, behind one interface.

Attention layers keep paged blocks with the prefix cache (`PagedBlockManager`; when every
attention layer slides, `SlidingWindowBlockManager`, which releases blocks that fall out of the
window); recurrent-state layers keep one slot per running request
(`StateSlotManager`). `allocate_slots` admits a request only when every kind has room, and
`free` gives back what it holds of each kind (finish, abort, error and preemption all go
through it).

With recurrent layers a prefix-cache hit also needs the state at the end of the cached prefix:
`StateSlotManager` keeps snapshots of it at block boundaries, keyed by the same hash chain. A
hit is cut back to the longest prefix that has a snapshot, and prompt chunks are cut to end on
block boundaries (`align_chunk`) so snapshots get taken.
"""

from __future__ import annotations

import logging

from .block_pool import BlockPool, KVBlock
from .paged_blocks import PagedBlockManager
from .request import Request
from .sliding_window import SlidingWindowBlockManager
from .state_slots import StateSlotManager

logger = logging.getLogger(__name__)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        num_state_slots: int = 0,
        sliding_window: int | None = None,
    ) -> None:
        """`sliding_window`: every attention layer slides over at most this many tokens, so
        blocks out of the window are released early (None: some layer attends to all)."""
        if num_state_slots and enable_caching:
            logger.info(
                "prefix caching with recurrent-state snapshots at block boundaries; prompt "
                "chunks end on block boundaries"
            )
        self.blocks = (
            PagedBlockManager(num_blocks, block_size, enable_caching)
            if sliding_window is None
            else SlidingWindowBlockManager(num_blocks, block_size, sliding_window, enable_caching)
        )
        self.state = StateSlotManager(num_state_slots) if num_state_slots else None
        """None for models without recurrent layers."""
        self.num_snapshot_hits = 0
        """Admission lookups that found a state snapshot (a request may look up again when
        it could not be admitted at once)."""

    # ----------------------------------------------------------- the paged blocks' facts
    @property
    def pool(self) -> BlockPool:
        return self.blocks.pool

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def enable_caching(self) -> bool:
        return self.blocks.enable_caching

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    @property
    def prefix_queries(self) -> int:
        return self.blocks.prefix_queries

    @property
    def prefix_hits(self) -> int:
        return self.blocks.prefix_hits

    @property
    def num_state_slots(self) -> int:
        return 0 if self.state is None else self.state.num_slots

    @property
    def num_free_state_slots(self) -> int:
        return 0 if self.state is None else self.state.num_free_slots

    def blocks_for(self, num_tokens: int) -> int:
        return self.blocks.blocks_for(num_tokens)

    # ----------------------------------------------------------- per request
    @property
    def snapshots(self) -> bool:
        """Recurrent layers with prefix caching: state snapshots at block boundaries."""
        return self.state is not None and self.enable_caching

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """The cached prefix (see `PagedBlockManager`); with recurrent layers, cut back to
        the longest one whose end state has a snapshot (`req.restore_state_slot`)."""
        hits, num = self.blocks.get_computed_blocks(req)
        if self.state is None:
            return hits, num
        req.restore_state_slot = -1
        for k in range(len(hits), 0, -1):
            slot = self.state.lookup(req.block_hashes[k - 1])
            if slot is not None:
                req.restore_state_slot = slot
                self.num_snapshot_hits += 1
                return hits[:k], k * self.block_size
        return [], 0

    def align_chunk(self, req: Request, start: int, num_tokens: int) -> int:
        """With snapshots: a prompt chunk [start, start + num_tokens) that crosses a block
        boundary inside the prompt stops at the last one, so its end state is snapshotted."""
        if not self.snapshots:
            return num_tokens
        bs = self.block_size
        boundary = min(start + num_tokens, req.num_prompt_tokens) // bs * bs
        return boundary - start if start < boundary < start + num_tokens else num_tokens

    def take_snapshot(self, req: Request, reserve: int = 0) -> int | None:
        """After committing a chunk: a snapshot slot when the request's computed prompt tokens
        end on a block boundary with no snapshot yet (the workers fill it after the step),
        leaving at least `reserve` slots for waiting requests."""
        if not self.snapshots:
            return None
        c = req.num_computed_tokens
        if c == 0 or c % self.block_size or c > req.num_prompt_tokens:
            return None
        k = c // self.block_size
        if len(req.block_hashes) < k:
            return None
        return self.state.snapshot(req.block_hashes[k - 1], req.request_id, reserve)

    def snapshot_coming(self, req: Request, num_hit: int) -> bool:
        """Whether a snapshot not yet published would give `req` a longer cached prefix
        than `num_hit` (n > 1 sequences of one prompt, or the same prompt sent twice at
        once): it is visible once its step's result is back, so waiting that long copies the
        prompt's state instead of computing it again."""
        if not self.snapshots or not self.state.has_pending:
            return False
        max_blocks = (req.num_tokens - 1) // self.block_size
        hashes = req.block_hashes[num_hit // self.block_size : max_blocks]
        return any(self.state.is_pending(h) for h in hashes)

    def seal_snapshots(self, step_id: int) -> None:
        if self.state is not None:
            self.state.seal(step_id)

    def publish_snapshots(self, step_id: int, failed: set[str]) -> None:
        """A step's result is back: its snapshots become visible (those of failed requests
        are dropped)."""
        if self.state is not None:
            self.state.publish(step_id, failed)

    def record_lookup(self, num_tokens: int, num_hit: int) -> None:
        self.blocks.record_lookup(num_tokens, num_hit)

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> list[KVBlock] | None:
        """Room for `num_new_tokens` more tokens in every kind: the new blocks, or None (and
        nothing taken) when a kind is short. A request without a state slot takes one."""
        needs_slot = self.state is not None and req.state_slot < 0
        if needs_slot and not self.state.can_allocate():
            return None
        new = self.blocks.allocate_slots(req, num_new_tokens, computed_blocks)
        if new is not None and needs_slot:
            self.state.allocate(req)
        return new

    def cache_blocks(self, req: Request) -> None:
        self.blocks.cache_blocks(req)

    def free(self, req: Request) -> None:
        """Give back everything the request holds, of every kind."""
        self.blocks.free(req)
        if self.state is not None:
            self.state.free(req)
