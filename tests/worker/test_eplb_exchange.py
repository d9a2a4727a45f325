"""EPLB across expert-parallel ranks: the transfer plan, and weights moved between gloo
processes to placements the policy gives for random loads."""

from __future__ import annotations

import random

import pytest
import torch
import torch.multiprocessing as mp

from splitserve.entrypoints.launcher import free_port
from splitserve.testing.eplb_ranks import exchange_rounds
from splitserve.worker.eplb import keep_in_place, plan_transfers, rebalance_experts


def test_transfers_bring_each_rank_what_it_lacks_once_from_a_holder():
    old = [0, 1, 2, 3, 4, 5, 0, 1]  # 2 ranks x 4 slots; 0 and 1 replicated on rank 1
    new = [0, 2, 2, 4, 1, 3, 5, 5]
    transfers = plan_transfers(old, new, 2)
    got = {(t.expert, t.dst_rank) for t in transfers}
    assert got == {(4, 0), (3, 1)}  # rank 0 lacks 4; rank 1 lacks 3; the rest is local
    for t in transfers:
        assert old[t.src_rank * 4 + t.src_slot] == t.expert and t.src_rank != t.dst_rank
    assert plan_transfers(old, old, 2) == []


def test_sending_spreads_over_the_replicas():
    # Expert 0 is held by ranks 0 and 1; ranks 2 and 3 both need it: one each sends.
    old = [0, 1, 0, 2, 3, 4, 5, 6]
    new = [0, 1, 0, 2, 0, 4, 0, 6]
    sources = sorted(t.src_rank for t in plan_transfers(old, new, 4) if t.expert == 0)
    assert sources == [0, 1]


def test_transfers_refuse_an_expert_nobody_holds():
    with pytest.raises(ValueError, match="expert 7 is in no slot"):
        plan_transfers([0, 1, 2, 3], [0, 1, 7, 3], 2)


def _placements(num_experts: int, num_physical: int, ranks: int, rounds: int) -> list[list[int]]:
    rng = random.Random(3)
    placements = [[p % num_experts for p in range(num_physical)]]
    for _ in range(rounds):
        load = torch.tensor([[rng.paretovariate(1.2) for _ in range(num_experts)]])
        new = rebalance_experts(load, num_physical, ranks)[0].tolist()
        placements.append(keep_in_place(placements[-1], new, num_physical // ranks))
    return placements


@pytest.mark.parametrize(("num_experts", "redundant", "ranks"), [(8, 0, 2), (6, 3, 3)])
def test_weights_cross_ranks_to_each_new_placement(num_experts, redundant, ranks):
    placements = _placements(num_experts, num_experts + redundant, ranks, rounds=5)
    assert len({tuple(p) for p in placements}) >= 3, "the loads gave too few placements"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(target=exchange_rounds, args=(r, ranks, init, placements, num_experts, out))
        for r in range(ranks)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * ranks
    received = dict(out.get(timeout=5) for _ in range(ranks))
    assert sum(received.values()) > 0, "no expert ever crossed ranks"
