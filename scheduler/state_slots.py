"""Recurrent-state slots: one per running request of a model with state-space layers, and
prefix-cache snapshots of the state in the slots no request holds.

A slot indexes every recurrent layer's state tensors on the workers (conv state and SSM state).
A request takes one when it is admitted and keeps it until it finishes, is aborted, fails or is
preempted; it then goes back to the free list. Preemption recomputes, so a preempted request's
state is simply dropped.

Snapshots (prefix caching): when a step's prompt chunk ends on a block boundary, the workers copy
the request's state into a slot keyed by the hash of that block (the prefix cache's SHA-256
chain, so the key covers every token before it). A later request whose prompt starts with the
same blocks copies the snapshot into its own slot and computes from there. Snapshots live in
slots nobody runs in and are evicted least recently used when a request needs a slot. A
snapshot planned in a step stays pending (neither visible nor evictable) until that step's
result is back: then the workers have written it, and a request that failed in that step
(whose state was never computed) has its snapshot dropped instead of published.
"""

from __future__ import annotations

from collections import OrderedDict

from .request import Request


class StateSlotManager:
    """Hands out slot ids 0..num_slots-1; `req.state_slot` holds a request's (-1: none)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        # NOTE: a stack: the slot freed last is reused first (its state lines are warm).
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._owner: dict[int, str] = {}
        self._snapshots: OrderedDict[bytes, int] = OrderedDict()
        """Block hash -> slot holding the state after that block; least recently used first."""
        self._pending: dict[int, list[tuple[bytes, int, str]]] = {}
        """Step id -> (block hash, slot, request id) of the snapshots it takes; -1 while the
        step is being planned."""
        self.num_snapshots_taken = 0

    @property
    def num_free_slots(self) -> int:
        """Slots no request runs in (snapshots included: they give way on demand)."""
        return self.num_slots - len(self._owner)

    @property
    def num_snapshots(self) -> int:
        return len(self._snapshots) + sum(len(v) for v in self._pending.values())

    def can_allocate(self) -> bool:
        return bool(self._free) or bool(self._snapshots)

    def _take(self) -> int | None:
        if self._free:
            return self._free.pop()
        if self._snapshots:
            return self._snapshots.popitem(last=False)[1]
        return None

    def allocate(self, req: Request) -> int:
        """Give `req` a slot (evicting the oldest snapshot when none is free); RuntimeError if
        it holds one already or every slot runs a request."""
        if req.state_slot >= 0:
            raise RuntimeError(f"{req.request_id} already holds state slot {req.state_slot}")
        slot = self._take()
        if slot is None:
            raise RuntimeError("no free state slot")
        self._owner[slot] = req.request_id
        req.state_slot = slot
        return slot

    def free(self, req: Request) -> None:
        """Give back the request's slot (nothing when it holds none)."""
        slot = req.state_slot
        if slot < 0:
            return
        if self._owner.get(slot) != req.request_id:
            raise RuntimeError(f"{req.request_id} frees state slot {slot}, which it does not hold")
        del self._owner[slot]
        self._free.append(slot)
        req.state_slot = -1

    # ------------------------------------------------------------------ snapshots
    def lookup(self, block_hash: bytes) -> int | None:
        """The slot of a visible snapshot after `block_hash` (now most recently used)."""
        slot = self._snapshots.get(block_hash)
        if slot is not None:
            self._snapshots.move_to_end(block_hash)
        return slot

    def snapshot(self, block_hash: bytes, request_id: str, reserve: int = 0) -> int | None:
        """A slot for a new snapshot after `block_hash`, taken by `request_id`'s step; None
        when it exists already, or when fewer than `reserve` slots (free or held by published
        snapshots, which give way) would be left for requests waiting to run."""
        if block_hash in self._snapshots or self.is_pending(block_hash):
            return None
        if len(self._free) + len(self._snapshots) <= reserve:
            return None
        slot = self._take()
        if slot is None:
            return None
        self._pending.setdefault(-1, []).append((block_hash, slot, request_id))
        self.num_snapshots_taken += 1
        return slot

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def is_pending(self, block_hash: bytes) -> bool:
        """Whether a snapshot after `block_hash` is planned and not yet published."""
        return any(h == block_hash for v in self._pending.values() for h, _, _ in v)

    def seal(self, step_id: int) -> None:
        """The step being planned got its id: its snapshots wait for its result."""
        planned = self._pending.pop(-1, None)
        if planned:
            self._pending[step_id] = planned

    def publish(self, step_id: int, failed: set[str] | frozenset[str] = frozenset()) -> None:
        """Step `step_id`'s result is back: publish its snapshots, except those of requests
        that failed in it (their slots go back to the free list)."""
        for block_hash, slot, request_id in self._pending.pop(step_id, ()):
            if request_id in failed:
                self._free.append(slot)
            else:
                self._snapshots[block_hash] = slot
