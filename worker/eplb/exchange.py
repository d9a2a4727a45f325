"""Moving expert weights between expert-parallel ranks to a new placement, in place.

A layer's P physical slots are split over the EP ranks, S = P / ranks each: rank r holds
slots [r * S, (r + 1) * S) as stacks [S, ...]. To go from placement `old` to `new` (a logical
expert per global slot, both known to every rank) each rank:

1. works out the same transfer list (`plan_transfers`): for every expert a rank needs and does
   not hold, one sender among the ranks holding it (the one sending least so far, so the load
   of sending spreads over replicas);
2. posts its receives (into one buffer per expert it gains, per stack) and its sends (straight
   from its slots), all at once, and waits for them: point-to-point over the stage's group
   (gloo on CPU, NCCL on CUDA), so no rank reads a slot another rank has already overwritten;
3. rearranges its own slots in place (`rearrange.rearrange_expert_weights`), the received
   buffers joining as read-only sources.

Extra memory: the received experts of one layer (at most S experts, one layer's local stacks)
plus at most one expert of scratch for a cycle within the rank; freed before the next layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .rearrange import RearrangeStats, rearrange_expert_weights


@dataclass(frozen=True, slots=True)
class Transfer:
    """One expert crossing from rank `src_rank` (its local slot `src_slot`) to `dst_rank`."""

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int


def plan_transfers(old: Sequence[int], new: Sequence[int], num_ranks: int) -> list[Transfer]:
    """The experts each rank must receive to hold `new`'s experts, each from one holder in
    `old`; the same list on every rank (pure, deterministic)."""
    if len(old) != len(new) or len(new) % num_ranks:
        raise ValueError(f"placements of {len(old)} and {len(new)} slots over {num_ranks} ranks")
    slots = len(old) // num_ranks
    holders: dict[int, list[tuple[int, int]]] = {}
    for p, expert in enumerate(old):
        holders.setdefault(expert, []).append((p // slots, p % slots))
    sends = [0] * num_ranks
    out: list[Transfer] = []
    for dst in range(num_ranks):
        have = set(old[dst * slots : (dst + 1) * slots])
        for expert in sorted(set(new[dst * slots : (dst + 1) * slots]) - have):
            if expert not in holders:
                raise ValueError(f"expert {expert} is in no slot of the old placement")
            # NOTE: holders of `expert` are never dst itself (dst does not have it).
            src, slot = min(holders[expert], key=lambda h: (sends[h[0]], h[0], h[1]))
            sends[src] += 1
            out.append(Transfer(expert, src, slot, dst))
    return out


def exchange_expert_weights(
    stacks: Sequence[torch.Tensor],
    old: Sequence[int],
    new: Sequence[int],
    rank: int,
    num_ranks: int,
    group=None,
) -> tuple[RearrangeStats, int]:
    """Move this rank's slots of one layer (`stacks`, each [S, ...]) from the global placement
    `old` to `new`; every rank of `group` calls it with the same placements.

    Returns:
        (the local rearrangement's stats, experts this rank received).
    """
    slots = len(old) // num_ranks
    if any(stack.shape[0] != slots for stack in stacks):
        raise ValueError(f"every stack must hold this rank's {slots} slots")
    transfers = plan_transfers(old, new, num_ranks)
    received: list[tuple[int, list[torch.Tensor]]] = []
    ops: list[dist.P2POp] = []
    for index, t in enumerate(transfers):
        if rank not in (t.src_rank, t.dst_rank):
            continue
        peer = t.src_rank if t.dst_rank == rank else t.dst_rank
        peer = dist.get_global_rank(group, peer) if group is not None else peer
        if t.dst_rank == rank:
            buffers = [torch.empty_like(stack[0]) for stack in stacks]
            received.append((t.expert, buffers))
            tensors, op = buffers, dist.irecv
        else:
            tensors, op = [stack[t.src_slot] for stack in stacks], dist.isend
        for k, tensor in enumerate(tensors):
            ops.append(dist.P2POp(op, tensor, peer, group, tag=index * len(stacks) + k))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    mine = slice(rank * slots, (rank + 1) * slots)
    stats = rearrange_expert_weights(stacks, old[mine], new[mine], received)
    return stats, len(received)
