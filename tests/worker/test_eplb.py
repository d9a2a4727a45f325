"""EPLB's single-process parts: the placement policy (balance improves on skewed loads, every
expert keeps a slot, equal slots per rank, groups stay within a node), the map's spread over
replicas, the windowed counters, in-place rearrangement with one scratch expert, and a MoE
layer whose output does not change across rebalances."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from splitserve.worker.eplb import (
    EplbConfig,
    EplbState,
    ExpertLoadCounter,
    ExpertMap,
    balancedness,
    keep_in_place,
    plan_moves,
    rank_loads,
    rearrange_expert_weights,
    rebalance_experts,
)
from splitserve.worker.eplb.policy import balanced_packing, replicate
from splitserve.worker.moe import QWEN_EXPERT_NAMES, SparseMoE


def _skewed(num_layers: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Zipf-like loads, hottest expert at a different index in each layer."""
    gen = torch.Generator().manual_seed(seed)
    base = 1000.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.2
    return torch.stack(
        [base[torch.randperm(num_experts, generator=gen)] for _ in range(num_layers)]
    )


def test_replicate_gives_spare_slots_to_the_hottest_per_replica():
    assert replicate([100, 1, 1, 1], 6) == [3, 1, 1, 1]
    assert replicate([10, 9, 1], 5) == [2, 2, 1]
    assert replicate([5, 5], 2) == [1, 1]
    with pytest.raises(ValueError, match="3 slots cannot hold 4 experts"):
        replicate([1, 1, 1, 1], 3)


def test_balanced_packing_fills_packs_equally_and_evens_them():
    weights = [9, 8, 7, 1, 1, 1, 5, 4]
    packs = balanced_packing(weights, 2)
    assert [len(p) for p in packs] == [4, 4]
    assert sorted(i for p in packs for i in p) == list(range(8))
    totals = sorted(sum(weights[i] for i in p) for p in packs)
    assert totals[1] - totals[0] <= 2  # greedy: 17 and 19 of 36 (a naive split: 25 and 11)
    with pytest.raises(ValueError, match="do not split evenly"):
        balanced_packing(weights, 3)


@pytest.mark.parametrize("num_experts,redundant,ranks", [(16, 4, 4), (8, 0, 4), (12, 4, 8)])
def test_policy_improves_balance_and_keeps_every_expert(num_experts, redundant, ranks):
    load = _skewed(3, num_experts)
    physical = num_experts + redundant
    initial = ExpertMap.initial(3, num_experts, physical).phy2log
    placement = rebalance_experts(load, physical, ranks)
    assert placement.shape == (3, physical) and placement.dtype == torch.int64
    for row in placement.tolist():
        assert set(row) == set(range(num_experts))  # every expert keeps >= 1 slot
    before = balancedness(rank_loads(initial, load, ranks))
    after = balancedness(rank_loads(placement, load, ranks))
    assert after > before + 0.05, (before, after)
    # Every rank gets an equal share of the slots and (nearly) of the total load.
    per_rank = rank_loads(placement, load, ranks)
    torch.testing.assert_close(per_rank.sum(-1), load.sum(-1))
    if redundant:
        hottest = load.argmax(dim=1)
        counts = [row.count(int(h)) for row, h in zip(placement.tolist(), hottest, strict=True)]
        assert min(counts) >= 2  # the hottest expert of each layer is replicated


def test_hierarchical_policy_keeps_each_group_on_one_node():
    num_experts, groups, nodes, ranks, physical = 16, 4, 2, 4, 24
    load = _skewed(2, num_experts, seed=3)
    placement = rebalance_experts(load, physical, ranks, num_groups=groups, num_nodes=nodes)
    slots_per_node = physical // nodes
    for row in placement.tolist():
        assert set(row) == set(range(num_experts))
        node_of = {}
        for slot, expert in enumerate(row):
            node_of.setdefault(expert // (num_experts // groups), set()).add(slot // slots_per_node)
        assert all(len(n) == 1 for n in node_of.values()), node_of
    # Groups that do not divide over the nodes: the policy packs the cluster as one node.
    flat = rebalance_experts(load, physical, ranks, num_groups=3, num_nodes=2)
    assert torch.equal(flat, rebalance_experts(load, physical, ranks))


def test_policy_refuses_slots_that_do_not_divide():
    with pytest.raises(ValueError, match="multiple of the 4 ranks"):
        rebalance_experts(torch.ones(1, 8), 10, 4)


def test_map_spreads_a_replicated_expert_over_its_replicas():
    placement = torch.tensor([[0, 1, 2, 0, 3, 0]])
    expert_map = ExpertMap(placement, 4)
    assert expert_map.logcnt.tolist() == [[3, 1, 1, 1]]
    assert expert_map.log2phy[0, 0].tolist() == [0, 3, 5]
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [0, 2], [0, 3]])
    physical = expert_map.to_physical(0, ids)
    assert (placement[0][physical] == ids).all()  # each slot holds the chosen expert
    zero_slots = physical[ids == 0].tolist()
    assert sorted(zero_slots.count(s) for s in (0, 3, 5)) == [2, 2, 2]
    # One-token decode steps rotate over the replicas as well.
    decode = [int(expert_map.to_physical(0, torch.tensor([[0, 1]]))[0, 0]) for _ in range(6)]
    assert sorted(decode.count(s) for s in (0, 3, 5)) == [2, 2, 2]
    with pytest.raises(ValueError, match=r"without a slot: \[\[0, 2\]\]"):
        expert_map.update(torch.tensor([[0, 1, 3, 0, 3, 0]]))


def test_counter_keeps_a_sliding_window_of_steps():
    counter = ExpertLoadCounter(num_layers=2, num_experts=3, window_size=2)
    steps = [
        [torch.tensor([[0, 1]]), torch.tensor([[2, 2]])],
        [torch.tensor([[1, 1], [1, 0]]), torch.tensor([[0, 2]])],
        [torch.tensor([[2, 0]]), torch.tensor([[1, 0]])],
    ]
    for step in steps:
        for layer, ids in enumerate(step):
            counter.record(layer, ids)
        counter.advance()
    # Only the last two steps are in the window.
    assert counter.window_load().tolist() == [[2, 3, 1], [2, 1, 1]]
    counter.record(0, torch.tensor([[0, 0]]))  # an open step is not in the window
    assert counter.window_load()[0].tolist() == [2, 3, 1]


def _random_placement(rng: random.Random, num_experts: int, num_physical: int) -> list[int]:
    slots = list(range(num_experts)) + [rng.randrange(num_experts) for _ in range(num_physical - num_experts)]  # fmt: skip
    rng.shuffle(slots)
    return slots


def test_rearrangement_moves_weights_in_place_with_one_scratch_expert():
    rng = random.Random(0)
    for _ in range(200):
        num_experts = rng.randint(1, 8)
        num_physical = num_experts + rng.randint(0, 5)
        old = _random_placement(rng, num_experts, num_physical)
        new = _random_placement(rng, num_experts, num_physical)
        weights = torch.randn(num_experts, 3, 2)
        scales = torch.randn(num_experts, 2)
        stacks = [weights[old].clone(), scales[old].clone()]
        addresses = [s.data_ptr() for s in stacks]
        stats = rearrange_expert_weights(stacks, old, new)
        assert torch.equal(stacks[0], weights[new]) and torch.equal(stacks[1], scales[new])
        assert [s.data_ptr() for s in stacks] == addresses
        assert stats.peak_buffers <= 1
    cycle = plan_moves([0, 1, 2], [1, 2, 0])
    assert [m[0] for m in cycle].count("save") == 1 and len(cycle) == 4
    assert plan_moves([0, 1, 0], [0, 1, 0]) == []
    with pytest.raises(ValueError, match=r"experts \[3\] are in no slot"):
        plan_moves([0, 1], [0, 3])


def test_keep_in_place_reorders_within_ranks_only():
    old = [0, 1, 2, 3, 4, 5]
    new = [1, 3, 0, 2, 5, 5]  # rank 0 gets {0, 1, 3} (was {0, 1, 2}), rank 1 {2, 5, 5}
    kept = keep_in_place(old, new, 3)
    assert kept == [0, 1, 3, 2, 5, 5]
    for r in range(2):
        assert sorted(kept[3 * r : 3 * r + 3]) == sorted(new[3 * r : 3 * r + 3])
    assert len(plan_moves(old, kept)) < len(plan_moves(old, new))
    rng = random.Random(1)
    for _ in range(100):
        old = _random_placement(rng, 6, 12)
        new = _random_placement(rng, 6, 12)
        kept = keep_in_place(old, new, 4)
        assert all(sorted(kept[i : i + 4]) == sorted(new[i : i + 4]) for i in range(0, 12, 4))
        assert sum(a == b for a, b in zip(old, kept)) >= sum(a == b for a, b in zip(old, new))


def _moe_model(num_layers=2, num_experts=6, top_k=2) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        *(SparseMoE(16, num_experts, top_k, 12, True, QWEN_EXPERT_NAMES) for _ in range(num_layers))
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@torch.inference_mode()
def test_layers_under_eplb_compute_the_same_across_rebalances():
    plain = _moe_model()
    model = _moe_model()
    state = EplbState.attach(model, EplbConfig(window_size=2, step_interval=2, num_redundant_experts=2), num_ranks=2)  # fmt: skip
    assert model[0].experts.gate_up_proj.shape[0] == 8
    x = torch.randn(23, 16)
    expected = plain(x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert state.step() is None
    model(x)
    result = state.step()  # the second step rebalances on the window's load
    assert result is not None and state.num_rebalances == 1
    # Force a placement no window would give: expert 5 hot in both layers.
    skew = torch.ones(2, 6)
    skew[:, 5] = 1000
    before = [state.map.placement(layer) for layer in range(2)]
    forced = state.rebalance(skew)
    after = [state.map.placement(layer) for layer in range(2)]
    assert before != after and all(row.count(5) == 3 for row in after)
    assert forced.changed_layers >= 1 and forced.peak_buffers <= 1
    assert forced.balancedness_after > forced.balancedness_before
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    idle = state.rebalance(torch.zeros(2, 6))  # no traffic: nothing moves
    assert idle.changed_layers == 0 and state.map.placement(0) == after[0]
    load = state.counter.window_load()
    assert load.sum().item() == 2 * 2 * 23 * 2  # 2 steps in the window, 2 layers, 23 x top-2
    with pytest.raises(ValueError, match="already under EPLB"):
        EplbState.attach(model, EplbConfig())
    with pytest.raises(ValueError, match="do not divide over 4 ranks"):
        EplbState.attach(_moe_model(), EplbConfig(num_redundant_experts=1), num_ranks=4)
    with pytest.raises(ValueError, match="needs a model with MoE layers"):
        EplbState.attach(nn.Linear(2, 2), EplbConfig())
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        EplbConfig(window_size=0)
