"""Moving one process's expert weights to a new placement in place, with bounded extra memory.

A layer's experts are stacks [P, ...] (weights, and scales for FP8), slot p holding logical
expert old[p]; afterwards slot p must hold new[p]. `plan_moves` orders the copies so that a
slot is overwritten only once what it holds is no longer needed or is held elsewhere (a slot
already final, another slot, or the scratch buffer); when every remaining slot's content is
still needed and held nowhere else (a cycle: a permutation of experts among slots), one
slot's content is saved to a scratch buffer of one expert, which breaks the cycle. The extra
memory is the scratch buffers the plan uses (`RearrangeStats.peak_buffers`, one expert's
tensors each; one suffices in every case the tests generate).

Across expert-parallel ranks (`exchange.py`), the experts a rank gains arrive first into
buffers, which join the plan as read-only sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Move = tuple[str, int, int]
"""("copy", dst slot, src slot) | ("save", buffer, src slot) | ("load", dst slot, buffer)."""


@dataclass(frozen=True, slots=True)
class RearrangeStats:
    """What one rearrangement did."""

    copies: int
    """Expert copies made (slot to slot, to and from the scratch buffer)."""
    peak_buffers: int
    """Scratch buffers (one expert's tensors each) held at once, at most."""


def keep_in_place(old: Sequence[int], new: Sequence[int], slots_per_rank: int) -> list[int]:
    """`new` with each rank's experts reordered within the rank so that as many slots as
    possible keep the expert they hold in `old` (the order of slots within a rank is free:
    only which experts a rank holds matters), so a rebalance copies only what moves."""
    if len(old) != len(new) or len(new) % slots_per_rank:
        raise ValueError(f"placements of {len(old)} and {len(new)} slots, {slots_per_rank} a rank")
    out: list[int] = []
    for start in range(0, len(new), slots_per_rank):
        before = list(old[start : start + slots_per_rank])
        wanted = list(new[start : start + slots_per_rank])
        row: list[int | None] = [None] * slots_per_rank
        for i, expert in enumerate(before):
            if expert in wanted:
                wanted.remove(expert)
                row[i] = expert
        rest = iter(wanted)
        out += [e if e is not None else next(rest) for e in row]
    return out


def plan_moves(old: Sequence[int], new: Sequence[int]) -> list[Move]:
    """The in-place copies turning slot contents `old` into `new` (both: a logical expert per
    slot; every expert of `new` must appear in `old`)."""
    if len(old) != len(new):
        raise ValueError(f"placements differ in length: {len(old)} and {len(new)} slots")
    missing = set(new) - set(old)
    if missing:
        raise ValueError(f"experts {sorted(missing)} are in no slot of the old placement")
    cur = list(old)
    pending = {p for p in range(len(new)) if cur[p] != new[p]}
    holders: dict[int, set[int]] = {}
    for p, e in enumerate(cur):
        holders.setdefault(e, set()).add(p)
    needed: dict[int, int] = {}
    for p in pending:
        needed[new[p]] = needed.get(new[p], 0) + 1
    buffers: dict[int, int] = {}  # buffer index -> expert
    moves: list[Move] = []

    def held(e: int) -> int:
        return len(holders.get(e, ())) + sum(1 for b in buffers.values() if b == e)

    while pending:
        ready = next(
            (p for p in sorted(pending) if not needed.get(cur[p]) or held(cur[p]) > 1), None
        )
        if ready is None:  # a cycle: save one content, then its slot is free
            p = min(pending)
            index = min(set(range(len(buffers) + 1)) - set(buffers))
            buffers[index] = cur[p]
            moves.append(("save", index, p))
            continue
        p, target = ready, new[ready]
        sources = holders.get(target)
        if sources:
            moves.append(("copy", p, min(sources)))
        else:
            moves.append(("load", p, next(i for i, e in buffers.items() if e == target)))
        holders[cur[p]].discard(p)
        holders.setdefault(target, set()).add(p)
        cur[p] = target
        pending.discard(p)
        needed[target] -= 1
        for index in [i for i, e in buffers.items() if not needed.get(e) or holders.get(e)]:
            del buffers[index]
    return moves


def rearrange_expert_weights(
    stacks: Sequence[torch.Tensor],
    old: Sequence[int],
    new: Sequence[int],
    received: Sequence[tuple[int, Sequence[torch.Tensor]]] = (),
) -> RearrangeStats:
    """Rewrite every stack [P, ...] in place so slot p holds expert new[p] (it held old[p]).

    `received`: (expert, one tensor per stack) that arrived from other ranks, read-only
    sources beside the slots (`exchange.exchange_expert_weights`)."""
    num_slots = len(old)
    old = [*old, *(e for e, _ in received)]
    new = [*new, *(e for e, _ in received)]  # NOTE: the received copies stay where they are
    moves = plan_moves(old, new)
    scratch: dict[int, list[torch.Tensor]] = {}
    peak = 0

    def source(index: int, b: int) -> torch.Tensor:
        return stacks[index][b] if b < num_slots else received[b - num_slots][1][index]

    with torch.no_grad():
        for kind, a, b in moves:
            if kind == "copy":
                for index, stack in enumerate(stacks):
                    stack[a].copy_(source(index, b))
            elif kind == "save":
                if a not in scratch:
                    scratch[a] = [torch.empty_like(stack[0]) for stack in stacks]
                for index, buf in enumerate(scratch[a]):
                    buf.copy_(source(index, b))
                peak = max(peak, len(scratch))
            else:
                for buf, stack in zip(scratch[b], stacks, strict=True):
                    stack[a].copy_(buf)
    return RearrangeStats(copies=len(moves), peak_buffers=peak)
