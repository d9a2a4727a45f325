"""The layers' cache specs as the scheduler reads them from Describe, and the memory plan.

Each worker rank reports one `LayerCacheSpec` per layer: full attention and sliding-window
attention keep paged blocks (a block's bytes over every attention layer of the rank), a
recurrent-state layer keeps one fixed-size state per running request (a slot's bytes over every
such layer). The plan splits each rank's KV budget between blocks and state slots; the
scheduler then takes the smallest answer over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.protos import worker_pb2

Kind = worker_pb2.LayerCacheSpec.Kind
ATTENTION_KINDS = frozenset({Kind.KIND_FULL_ATTENTION, Kind.KIND_SLIDING_WINDOW})

MAX_STATE_SHARE = 0.5
"""Most of a hybrid model's budget (attention and recurrent layers) the state slots may take."""


@dataclass(slots=True)
class RankCache:
    """One rank's cache needs, summed over its layers by kind."""

    bytes_per_block: int
    """Bytes of one paged block over the rank's attention layers (0: none)."""
    bytes_per_state_slot: int
    """Bytes of one request's recurrent state over the rank's recurrent layers (0: none)."""
    available_bytes: int
    """What the rank can give to its caches."""

    @classmethod
    def of(cls, rank: worker_pb2.DescribeResponse) -> RankCache:
        """From a Describe answer; a worker that reports no specs has attention only."""
        specs = list(rank.cache_specs)
        if not specs:
            return cls(rank.bytes_per_block, 0, rank.available_kv_bytes)
        for s in specs:
            if s.kind not in ATTENTION_KINDS and s.kind != Kind.KIND_RECURRENT_STATE:
                raise ValueError(
                    f"worker rank {rank.rank} reports layer {s.layer_idx} with cache kind "
                    f"{s.kind}, which this scheduler does not know"
                )
        return cls(
            sum(s.page_bytes for s in specs if s.kind in ATTENTION_KINDS),
            sum(s.page_bytes for s in specs if s.kind == Kind.KIND_RECURRENT_STATE),
            rank.available_kv_bytes,
        )


@dataclass(slots=True)
class CachePlan:
    num_blocks: int
    num_state_slots: int
    """0 when no rank has recurrent layers."""
    sliding_window: int | None = None
    """Set when every attention layer slides (see `common_sliding_window`)."""


def common_sliding_window(ranks: list[worker_pb2.DescribeResponse]) -> int | None:
    """The widest window when every attention layer of every rank slides; None when some
    layer attends to everything (or no rank reports its specs)."""
    specs = [s for r in ranks for s in r.cache_specs if s.kind in ATTENTION_KINDS]
    if not specs or any(s.kind != Kind.KIND_SLIDING_WINDOW for s in specs):
        return None
    return max(s.sliding_window for s in specs)


def plan_rank(
    rank: RankCache, max_num_seqs: int, blocks_per_seq: int, block_override: int | None
) -> CachePlan:
    """Split one rank's budget: state slots first (at most one per running request, and at
    most MAX_STATE_SHARE of the budget when attention layers want blocks too), blocks from
    the rest. Without attention layers blocks cost nothing: there are enough for every slot
    to hold a whole context (they only count tokens), unless `block_override` says otherwise."""
    slots = 0
    budget = rank.available_bytes
    if rank.bytes_per_state_slot:
        share = budget if not rank.bytes_per_block else int(budget * MAX_STATE_SHARE)
        slots = min(max_num_seqs, share // rank.bytes_per_state_slot)
        if slots < 1:
            raise ValueError(
                f"no room for a single recurrent-state slot ({rank.bytes_per_state_slot} bytes "
                f"per request; {budget} bytes available); raise --kv-cache-memory or "
                "--gpu-memory-utilization"
            )
        budget -= slots * rank.bytes_per_state_slot
    if block_override is not None:
        blocks = block_override
    elif rank.bytes_per_block:
        blocks = budget // rank.bytes_per_block
    else:
        blocks = max(slots, 1) * blocks_per_seq
    if blocks < 1:
        raise ValueError(
            f"no room for a single KV block ({rank.bytes_per_block} bytes per block on the "
            "largest rank); raise --kv-cache-memory or --gpu-memory-utilization"
        )
    return CachePlan(int(blocks), int(slots))


def plan_cache(
    ranks: list[worker_pb2.DescribeResponse],
    max_num_seqs: int,
    max_model_len: int,
    block_size: int,
    block_override: int | None = None,
) -> CachePlan:
    """The blocks and state slots every rank can hold (the minimum over the ranks)."""
    blocks_per_seq = -(-max_model_len // block_size)
    plans = [
        plan_rank(RankCache.of(r), max_num_seqs, blocks_per_seq, block_override) for r in ranks
    ]
    slots = [p.num_state_slots for p in plans if p.num_state_slots]
    return CachePlan(
        min(p.num_blocks for p in plans), min(slots) if slots else 0, common_sliding_window(ranks)
    )
