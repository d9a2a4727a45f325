"""The sliding-window block manager: when every attention layer slides, blocks that fall out
of the window go back to the pool while the request runs.

The fake worker reads a context back only over the window, through the block table: a block
released too early and reused by another request changes the output (or fails the read-back
assertion)."""

from __future__ import annotations

from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.engine_core import EngineCore
from splitserve.scheduler.sliding_window import SlidingWindowBlockManager

from .fake_worker import FakeWorkerExecutor
from .utils import gen_request, prompts, run_to_completion

WINDOW = 8


def make(num_blocks, window=WINDOW, **cfg):
    ex = FakeWorkerExecutor(num_blocks, sliding_window=window)
    return EngineCore(SchedulerConfig(block_size=4, **cfg), ex), ex


def reference(ps, max_tokens):
    out = {}
    for i, p in enumerate(ps):
        engine, _ = make(1024, enable_prefix_caching=False)
        engine.scheduler.add_request(gen_request(f"r{i}", p, max_tokens))
        out.update(run_to_completion(engine))
    return out


def test_a_generation_longer_than_the_pool_runs_in_its_window():
    # 4 blocks of 4 tokens hold 16 tokens; the request grows to 10 + 150. A released block is
    # the next one taken: released too early, it is overwritten while still in the window.
    ps = [list(range(100, 110))]
    ref = reference(ps, 150)
    engine, _ = make(4)
    s = engine.scheduler
    assert isinstance(s.kv.blocks, SlidingWindowBlockManager)
    most = 0

    def watch(e):
        nonlocal most
        most = max(most, e.scheduler.kv.pool.num_blocks - e.scheduler.kv.num_free_blocks)

    s.add_request(gen_request("r0", ps[0], 150))
    assert run_to_completion(engine, on_step=watch) == ref
    assert s.num_preemptions == 0
    assert most <= 4  # the window (8 tokens) plus the block being written and one of margin
    assert s.kv.blocks.num_released > 30
    assert s.kv.num_free_blocks == s.kv.pool.num_blocks


def test_concurrent_requests_with_prefix_caching_match_alone():
    ps = prompts(6, lo=5, hi=30, seed=7)
    ps.append(list(ps[0]))  # a prefix-cache hit on blocks that may have been released
    ref = reference(ps, 40)
    engine, _ = make(40, max_num_batched_tokens=16)
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p, 40))
    assert run_to_completion(engine) == ref
    kv = engine.scheduler.kv
    assert kv.blocks.num_released > 0
    assert kv.num_free_blocks == kv.pool.num_blocks


def test_full_attention_keeps_every_block():
    ex = FakeWorkerExecutor(64)
    engine = EngineCore(SchedulerConfig(block_size=4), ex)
    assert not isinstance(engine.scheduler.kv.blocks, SlidingWindowBlockManager)


def test_release_boundary_keeps_the_window_and_one_token_of_margin():
    """Computing from position 40 with a window of 8 reads keys 33..40; a deferred position
    (39) reads 32..39. Blocks 0..7 (positions 0..31) go, block 8 (32..35) stays."""
    from splitserve.common import messages as msg
    from splitserve.scheduler.request import Request

    m = SlidingWindowBlockManager(64, 4, WINDOW, enable_caching=False)
    req = Request("r", list(range(40)), msg.SamplingParams(), 8, frozenset(), frozenset(), 0, 0)
    assert m.allocate_slots(req, 40) is not None
    req.num_computed_tokens = 40
    assert m.allocate_slots(req, 1) is not None
    assert req.num_skipped_blocks == 8
    assert [b.ref_cnt for b in req.blocks] == [0] * 8 + [1] * 3
    assert m.num_free_blocks == 64 - 3
    m.free(req)
    assert m.num_free_blocks == 64 and req.num_skipped_blocks == 0
