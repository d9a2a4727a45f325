"""EPLB placement benchmark on a skewed routing workload (CPU; ranks simulated).

A DeepSeek-like MoE (64 experts a layer, top-6, 4 layers) routed by a Zipf-skewed popularity
(a different permutation per layer) is spread over 8 expert-parallel ranks. The router's
choices are sampled for a window of steps, the policy (`worker.eplb.rebalance_experts`)
places the window's per-expert counts, and a fresh sample of the same workload (not the one
the policy saw) is routed through the map (`ExpertMap.to_physical`: a replicated expert's
pairs dealt over its replicas) and counted per rank. Reported: max / mean tokens per rank (1.0
is perfectly even; the busiest rank sets an EP step's time), before (experts e on rank
e // 8, no replicas) and after rebalancing, for 0, 8 and 16 redundant experts.

    python bench/eplb.py            # full run
    python bench/eplb.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse

import torch

from splitserve.worker.eplb import ExpertLoadCounter, ExpertMap, rebalance_experts


def _popularity(layers: int, experts: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    base = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
    return torch.stack([base[torch.randperm(experts, generator=gen)] for _ in range(layers)])


def _route(popularity: torch.Tensor, tokens: int, top_k: int, gen: torch.Generator):
    """Per layer, [tokens, top_k] distinct experts drawn by popularity."""
    return [torch.multinomial(p.expand(tokens, -1), top_k, generator=gen) for p in popularity]


def _max_over_mean(expert_map: ExpertMap, routes, ranks: int) -> float:
    """Max / mean tokens per rank, averaged over layers, for routed ids through the map."""
    ratios = []
    slots_per_rank = expert_map.num_physical // ranks
    for layer, ids in enumerate(routes):
        physical = expert_map.to_physical(layer, ids)
        per_rank = torch.bincount((physical // slots_per_rank).flatten(), minlength=ranks).double()
        ratios.append(float(per_rank.max() / per_rank.mean()))
    return sum(ratios) / len(ratios)


def run(steps: int, tokens: int, skew: float) -> None:
    layers, experts, top_k, ranks = 4, 64, 6, 8
    gen = torch.Generator().manual_seed(0)
    popularity = _popularity(layers, experts, skew, gen)
    counter = ExpertLoadCounter(layers, experts, window_size=steps)
    for _ in range(steps):
        for layer, ids in enumerate(_route(popularity, tokens, top_k, gen)):
            counter.record(layer, ids)
        counter.advance()
    window = counter.window_load()
    held_out = _route(popularity, tokens * steps, top_k, gen)
    print(
        f"{layers} layers x {experts} experts, top-{top_k}, {ranks} ranks, Zipf skew {skew}, "
        f"window {steps} steps x {tokens} tokens; max/mean tokens per rank on a fresh sample"
    )
    before = _max_over_mean(ExpertMap.initial(layers, experts, experts), held_out, ranks)
    for redundant in (0, 8, 16):
        physical = experts + redundant
        placement = rebalance_experts(window, physical, ranks)
        after = _max_over_mean(ExpertMap(placement, experts), held_out, ranks)
        print(
            f"  redundant {redundant:2d}: before {before:5.3f}, after {after:5.3f} "
            f"({before / after:4.2f}x less imbalance at the busiest rank)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of popularity")
    args = parser.parse_args()
    run(steps=4 if args.quick else 32, tokens=256, skew=args.skew)


if __name__ == "__main__":
    main()
