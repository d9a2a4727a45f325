"""The expert-placement policy of EPLB: which logical expert each physical slot holds.

Given each MoE layer's load (tokens per logical expert over a window), the policy gives the
hottest experts extra replicas in the `num_redundant_experts` spare slots and packs the
replicas onto ranks so that every rank holds the same number of slots and about the same load.
It is hierarchical, after the policy DeepSeek published for V3 (and vLLM uses): when the experts
form groups (DeepSeek-V3's node-limited routing) and the groups divide over the nodes, whole
groups are first packed onto nodes to even the nodes' loads (tokens of a group then stay within
a node), and replication and packing onto ranks happen within each node; otherwise the whole
cluster is one node.

Three steps, each a greedy heuristic:
- pack groups onto nodes: heaviest group first, onto the lightest node with room;
- replicate within a node: each spare slot goes to the expert with the highest load per
  replica (a replica of expert e carries load[e] / replicas[e] under the router's even spread);
- pack replicas onto ranks: heaviest replica first, onto the lightest rank with a free slot.

Pure functions over plain Python numbers (torch tensors in and out for the callers); nothing
here touches weights, devices or processes.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch


def replicate(loads: Sequence[float], num_slots: int) -> list[int]:
    """Replica counts (each >= 1, summing to num_slots): every extra slot goes to the expert
    whose load per replica is highest at that point (ties: the lower index)."""
    if num_slots < len(loads):
        raise ValueError(f"{num_slots} slots cannot hold {len(loads)} experts once each")
    counts = [1] * len(loads)
    heap = [(-float(load), e) for e, load in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(num_slots - len(loads)):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-float(loads[e]) / counts[e], e))
    return counts


def balanced_packing(weights: Sequence[float], num_packs: int) -> list[list[int]]:
    """Split items into num_packs packs of exactly len(weights) / num_packs items each,
    evening the packs' total weight: heaviest item first, into the lightest pack with room.

    Returns:
        the items (indices) of each pack, in the order they were placed.
    """
    if num_packs <= 0 or len(weights) % num_packs:
        raise ValueError(f"{len(weights)} items do not split evenly into {num_packs} packs")
    capacity = len(weights) // num_packs
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    totals = [0.0] * num_packs
    for item in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i)):
        pack = min(
            (p for p in range(num_packs) if len(packs[p]) < capacity), key=lambda p: (totals[p], p)
        )
        packs[pack].append(item)
        totals[pack] += float(weights[item])
    return packs


def _place_layer(
    load: list[float], num_physical: int, num_groups: int, num_nodes: int, num_ranks: int
) -> list[int]:
    num_experts = len(load)
    per_group = num_experts // num_groups
    group_loads = [sum(load[g * per_group : (g + 1) * per_group]) for g in range(num_groups)]
    slots_per_node = num_physical // num_nodes
    ranks_per_node = num_ranks // num_nodes
    phy2log: list[int] = []
    for node_groups in balanced_packing(group_loads, num_nodes):
        experts = [g * per_group + i for g in sorted(node_groups) for i in range(per_group)]
        counts = replicate([load[e] for e in experts], slots_per_node)
        replicas = [e for e, c in zip(experts, counts, strict=True) for _ in range(c)]
        count_of = dict(zip(experts, counts, strict=True))
        per_replica = [load[e] / count_of[e] for e in replicas]
        for rank_items in balanced_packing(per_replica, ranks_per_node):
            # Sorted by logical id within a rank, so equal placements compare equal.
            phy2log += sorted(replicas[i] for i in rank_items)
    return phy2log


def rebalance_experts(
    load: torch.Tensor,
    num_physical: int,
    num_ranks: int,
    num_groups: int = 1,
    num_nodes: int = 1,
) -> torch.Tensor:
    """A placement of every layer's logical experts onto num_physical slots over num_ranks.

    Args:
        load: [L, E] tokens (or any non-negative weight) per logical expert and layer.
        num_physical: slots per layer, E + num_redundant_experts; a multiple of num_ranks.
        num_ranks: expert-parallel ranks; rank r holds slots [r * S, (r + 1) * S), S =
            num_physical / num_ranks.
        num_groups, num_nodes: expert groups and nodes for the hierarchical policy; used when
            E % num_groups == 0, num_groups % num_nodes == 0 and num_ranks % num_nodes == 0,
            else the whole cluster is packed as one node.

    Returns:
        phy2log int64 [L, num_physical]: the logical expert of each slot. Every logical expert
        has at least one slot, every rank num_physical / num_ranks slots.
    """
    if load.dim() != 2:
        raise ValueError(f"load must be [layers, experts], got shape {tuple(load.shape)}")
    num_layers, num_experts = load.shape
    if num_physical < num_experts or num_physical % num_ranks:
        raise ValueError(
            f"num_physical {num_physical} must be >= the {num_experts} experts and a multiple "
            f"of the {num_ranks} ranks"
        )
    hierarchical = (
        num_groups > 0
        and num_experts % num_groups == 0
        and num_groups % num_nodes == 0
        and num_ranks % num_nodes == 0
        and num_physical % num_nodes == 0
    )
    if not hierarchical:
        num_groups = num_nodes = 1
    rows = load.double().cpu().tolist()
    placed = [_place_layer(row, num_physical, num_groups, num_nodes, num_ranks) for row in rows]
    return torch.tensor(placed, dtype=torch.int64).view(num_layers, num_physical)


def rank_loads(phy2log: torch.Tensor, load: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """[L, R] tokens per rank when each logical expert's load [L, E] is spread evenly over its
    replicas in placement phy2log [L, P]."""
    num_layers, num_physical = phy2log.shape
    replicas = torch.zeros_like(load, dtype=torch.float64)
    replicas.scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=torch.float64))
    per_slot = load.double().gather(1, phy2log) / replicas.gather(1, phy2log)
    return per_slot.view(num_layers, num_ranks, num_physical // num_ranks).sum(-1)


def balancedness(per_rank: torch.Tensor) -> float:
    """Mean over max of the ranks' loads, averaged over layers (1.0: perfectly even; layers
    without load count as even)."""
    per_rank = per_rank.double()
    peak = per_rank.max(dim=-1).values
    ratio = torch.where(peak > 0, per_rank.mean(dim=-1) / peak.clamp(min=1e-30), 1.0)
    return float(ratio.mean())
