"""Gloo rank bodies for multi-process EPLB tests (a spawned process imports its target
from an installed module, not from the tests folder)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def exchange_rounds(rank: int, size: int, init: str, placements, num_experts: int, out) -> None:
    """Rank `rank` of `size`: hold slots of `placements[0]` (random experts of two stacks),
    move through each next placement with `exchange_expert_weights`, checking every slot
    after each move; put (rank, experts received) on `out`."""
    from splitserve.worker.eplb import exchange_expert_weights

    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        group = dist.new_group(list(range(size)))
        gen = torch.Generator().manual_seed(0)
        weights = torch.randn(num_experts, 3, 5, generator=gen)
        scales = torch.arange(num_experts, dtype=torch.float16) + 0.5
        slots = len(placements[0]) // size
        mine = slice(rank * slots, (rank + 1) * slots)
        stacks = [weights[placements[0][mine]].clone(), scales[placements[0][mine]].clone()]
        addresses = [s.data_ptr() for s in stacks]
        received = 0
        for old, new in zip(placements, placements[1:], strict=False):
            _, got = exchange_expert_weights(stacks, old, new, rank, size, group)
            received += got
            assert torch.equal(stacks[0], weights[new[mine]]), (rank, new)
            assert torch.equal(stacks[1], scales[new[mine]]), (rank, new)
        assert [s.data_ptr() for s in stacks] == addresses  # moved in place
        out.put((rank, received))
    finally:
        dist.destroy_process_group()
