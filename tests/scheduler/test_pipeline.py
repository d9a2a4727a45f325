"""The scheduler over P > 1 pipeline ranks (a fake worker that plays rank 0's token view)."""

from __future__ import annotations

import pytest

from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.engine_core import EngineCore

from .fake_worker import FakeWorkerExecutor
from .test_scheduler import LENGTH, reference_outputs
from .utils import gen_request, prompts, run_to_completion


def pipeline_engine(pp: int, num_blocks: int = 200, **cfg) -> tuple[EngineCore, FakeWorkerExecutor]:
    ex = FakeWorkerExecutor(num_blocks, pipeline_parallel_size=pp)
    return EngineCore(SchedulerConfig(block_size=4, **cfg), ex), ex


@pytest.mark.parametrize(
    "pp,num_blocks,cfg",
    [
        (2, 200, {}),
        (3, 200, {}),
        (2, 200, {"max_num_batched_tokens": 9}),  # chunked prefill: chunks follow in flight
        (3, 40, {}),  # preemption by recompute while other micro-batches are in flight
    ],
    ids=["pp2", "pp3", "pp2-chunked", "pp3-preempt"],
)
def test_pipelined_outputs_equal_alone_and_nothing_leaks(pp, num_blocks, cfg):
    ps = prompts(12)
    ref = reference_outputs(ps)
    engine, ex = pipeline_engine(pp, num_blocks, **cfg)
    assert engine.max_inflight == pp
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p))
    got = run_to_completion(engine)  # the fake asserts rank 0 always has its tokens
    assert got == ref
    assert all(len(t) == 8 and r == LENGTH for t, r in got.values())
    assert ex.max_outstanding == pp
    assert engine.scheduler.kv.num_free_blocks == num_blocks
    if num_blocks == 40:
        assert engine.scheduler.num_preemptions > 0
    # Decodes travel with the tokens rank 0 has not seen: one each time.
    decodes = [c for s in ex.steps for c in s.cached_requests if c.new_token_ids]
    assert decodes and all(len(c.new_token_ids) == 1 for c in decodes)


def test_micro_batches_split_the_requests_evenly():
    engine, ex = pipeline_engine(2)
    for i, p in enumerate(prompts(12, lo=3, hi=6)):
        engine.scheduler.add_request(gen_request(f"r{i}", p, max_tokens=6))
    run_to_completion(engine)
    sizes = [len(s.num_scheduled_tokens) for s in ex.steps]
    assert sizes[:4] == [6, 6, 6, 6], sizes


def test_one_rank_keeps_placeholder_async_scheduling():
    engine, ex = pipeline_engine(1)
    assert engine.max_inflight == 2
    engine.scheduler.add_request(gen_request("a", [5, 6, 7], 4))
    run_to_completion(engine)
    # The same request in consecutive in-flight steps, no token ids sent back.
    assert [list(s.num_scheduled_tokens) for s in ex.steps[:2]] == [["a"], ["a"]]
    assert not any(c.new_token_ids for s in ex.steps for c in s.cached_requests)


def test_ranks_out_of_order_are_refused():
    ex = FakeWorkerExecutor(10, pipeline_parallel_size=2)
    ranks = ex.describe(4)
    ex.describe = lambda _bs, _engine: ranks[::-1]
    with pytest.raises(ValueError, match=r"ranks 0..1 .*\(1, 2\), \(0, 2\)"):
        EngineCore(SchedulerConfig(block_size=4), ex)
