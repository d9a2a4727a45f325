"""The KV-cache coordinator: one manager per kind of layer cache, behind one interface.

Attention layers keep paged blocks with the prefix cache (`PagedBlockManager`; when every
attention layer slides, `SlidingWindowBlockManager`, which releases blocks that fall out of the
window); recurrent-state layers keep one slot per running request
(`StateSlotManager`). `allocate_slots` admits a request only when every kind has room, and
`free` gives back what it holds of each kind (finish, abort, error and preemption all go
through it).

Prefix caching needs the state at the end of a cached prefix, which recurrent layers do not
keep per block: for such models it is turned off (one log line), never served wrong.
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
                "prefix caching is off: the model has recurrent-state layers, whose state "
                "at a cached prefix is not kept"
            )
            enable_caching = False
        self.blocks = (
            PagedBlockManager(num_blocks, block_size, enable_caching)
            if sliding_window is None
            else SlidingWindowBlockManager(num_blocks, block_size, sliding_window, enable_caching)
        )
        self.state = StateSlotManager(num_state_slots) if num_state_slots else None
        """None for models without recurrent layers."""

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
    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        return self.blocks.get_computed_blocks(req)

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
