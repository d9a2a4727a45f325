"""Recurrent-state slots: one per running request of a model with state-space layers.

A slot indexes every recurrent layer's state tensors on the workers (conv state and SSM state
of that request). A request takes one when it is admitted and keeps it until it finishes, is
aborted, fails or is preempted; it then goes back to the free list. Preemption recomputes, so
a preempted request's state is simply dropped.
"""

from __future__ import annotations

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

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self, req: Request) -> int:
        """Give `req` a slot; RuntimeError if it holds one already or none is free."""
        if req.state_slot >= 0:
            raise RuntimeError(f"{req.request_id} already holds state slot {req.state_slot}")
        if not self._free:
            raise RuntimeError("no free state slot")
        slot = self._free.pop()
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
