"""Recurrent-state slots in the cache coordinator: one per running request, never leaked,
admission refused when none is free; prefix-cache hits restore state snapshots.

The fake worker plays a model with one attention layer and one recurrent layer
(`state_slot_bytes`); it asserts that every new request carries a slot in range that no other
live request holds, and simulates each slot's state (the tokens folded into it): a restored
snapshot must hold exactly the cached tokens, and a request's state its computed ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from splitserve.common import messages as msg
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.engine_core import EngineCore
from splitserve.scheduler.request import Request
from splitserve.scheduler.state_slots import StateSlotManager

from .fake_worker import FakeWorkerExecutor
from .utils import gen_request, prompts, run_to_completion


def make_recurrent_engine(
    num_blocks: int = 64, slot_bytes: int = 16, block_size: int = 4, **cfg
) -> tuple[EngineCore, FakeWorkerExecutor]:
    """A budget of `num_blocks` bytes; the state slots take at most half of it."""
    ex = FakeWorkerExecutor(num_blocks, state_slot_bytes=slot_bytes)
    return EngineCore(SchedulerConfig(block_size=block_size, **cfg), ex), ex


def reference(ps, max_tokens=8):
    out = {}
    for i, p in enumerate(ps):
        engine, _ = make_recurrent_engine(num_blocks=1024)
        engine.scheduler.add_request(gen_request(f"r{i}", p, max_tokens))
        out.update(run_to_completion(engine))
    return out


def _idle(engine: EngineCore) -> None:
    kv = engine.scheduler.kv
    assert kv.num_free_state_slots == kv.num_state_slots
    assert kv.num_free_blocks == kv.pool.num_blocks


def test_plan_splits_the_budget_and_admission_waits_for_a_slot():
    engine, ex = make_recurrent_engine(num_blocks=64, slot_bytes=16)
    kv = engine.scheduler.kv
    # 64 bytes: half (32) to 16-byte slots, the rest to 1-byte blocks.
    assert (kv.num_state_slots, kv.pool.num_blocks) == (2, 32)
    assert ex.num_state_slots == 2
    ps = prompts(6, lo=3, hi=12)
    ref = reference(ps)
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p, 8))
    most_running = 0

    def watch(e):
        nonlocal most_running
        most_running = max(most_running, len(e.scheduler.running))
        assert len(e.scheduler.waiting) + len(e.scheduler.running) <= len(ps)

    got = run_to_completion(engine, on_step=watch)
    assert got == ref
    assert most_running == 2  # the blocks would allow more: the slots refused them
    assert ex.max_slots_in_use == 2  # only possible with the snapshot evicted
    _idle(engine)


def test_slots_survive_preemption_abort_and_errors():
    # 40 bytes: 1 slot of 16 would leave 24 blocks; 2 slots of 10 leave 20 one-byte blocks of
    # 4 tokens: two requests growing to 44 tokens cannot both fit, so one is preempted.
    engine, ex = make_recurrent_engine(num_blocks=40, slot_bytes=10)
    s = engine.scheduler
    assert s.kv.num_state_slots == 2
    ps = prompts(2, lo=30, hi=30, seed=3)
    ref = reference(ps, max_tokens=14)
    for i, p in enumerate(ps):
        s.add_request(gen_request(f"r{i}", p, 14))
    assert run_to_completion(engine) == ref
    assert s.num_preemptions > 0
    _idle(engine)

    # Abort while waiting and while running.
    for i, p in enumerate(prompts(3, seed=4)):
        s.add_request(gen_request(f"a{i}", p, 50))
    engine.step()
    assert {r.request_id for r in s.running} == {"a0", "a1"}
    assert s.kv.num_free_state_slots == 0
    assert s.abort_request("a2") and s.abort_request("a0")
    assert s.kv.num_free_state_slots == 1
    s.abort_request("a1")
    run_to_completion(engine)
    _idle(engine)

    # A per-request error from the worker finishes the request: its slot comes back.
    s.add_request(gen_request("e0", [5, 6, 7], 50))
    step = s.schedule()
    assert step is not None and s.kv.num_free_state_slots == 1
    outs = s.update_from_output(msg.StepResult(step_id=step.step_id, errors={"e0": "boom"}))
    assert outs[0].error == "boom"
    _idle(engine)


def test_prefix_hits_restore_state_snapshots(caplog):
    """A prompt chunk ends on the prompt's last block boundary and its state is snapshotted;
    the same prompt later starts from the snapshot (the fake worker checks the restored state
    holds exactly the cached tokens), reports the cached tokens and samples the same."""
    with caplog.at_level("INFO", logger="splitserve.scheduler.kv_cache_manager"):
        engine, ex = make_recurrent_engine(num_blocks=256, enable_prefix_caching=True)
    assert sum("snapshots at block boundaries" in r.getMessage() for r in caplog.records) == 1
    s = engine.scheduler
    prompt = list(range(10, 40))  # 30 tokens: 7 full blocks of 4
    outs, cached = {}, {}
    for rid in ("x", "y"):
        s.add_request(gen_request(rid, prompt, 4))
        for _ in range(100):
            if not engine.has_work:
                break
            for o in engine.step():
                outs.setdefault(rid, []).extend(o.token_ids)
                cached[rid] = o.num_cached_tokens
    assert outs["x"] == outs["y"]
    assert cached == {"x": 0, "y": 28}
    assert ex.num_restores == 1 and s.kv.state.num_snapshots_taken == 1
    assert s.stats().enable_prefix_caching
    # Multi-turn: the first turn's prompt and output, then more: a hit on the snapshot at 28.
    longer = prompt + outs["x"] + [7, 8, 9]
    s.add_request(gen_request("z", longer, 4))
    got = run_to_completion(engine)
    ref_engine, _ = make_recurrent_engine(num_blocks=256, enable_prefix_caching=False)
    ref_engine.scheduler.add_request(gen_request("z", longer, 4))
    assert got == run_to_completion(ref_engine)
    assert ex.num_restores == 2
    _idle(engine)


def test_the_same_prompt_twice_at_once_copies_the_state():
    """Two requests with one prompt arrive together (n = 2): the second waits one step for
    the first's snapshot and starts from it instead of computing the prompt again."""
    engine, ex = make_recurrent_engine(num_blocks=256, enable_prefix_caching=True)
    s = engine.scheduler
    prompt = list(range(10, 40))
    for rid in ("a", "b"):
        s.add_request(gen_request(rid, prompt, 5))
    cached = {}
    outs = {}
    while engine.has_work:
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
            cached[o.request_id] = o.num_cached_tokens
    assert outs["a"] == outs["b"] and len(outs["a"]) == 5
    assert cached == {"a": 0, "b": 28}
    assert ex.num_restores == 1
    _idle(engine)


def test_snapshots_give_way_to_running_requests():
    """Two slots: a snapshot taken while one request runs sits in the other; two requests
    running together then take both slots (the snapshot is evicted)."""
    engine, ex = make_recurrent_engine(num_blocks=64, slot_bytes=16, enable_prefix_caching=True)
    s = engine.scheduler
    assert s.kv.num_state_slots == 2
    ps = prompts(3, lo=9, hi=20, seed=5)
    ref = reference(ps)
    s.add_request(gen_request("r0", ps[0], 8))
    got = run_to_completion(engine)
    assert s.kv.state.num_snapshots == 1
    for i in (1, 2):
        s.add_request(gen_request(f"r{i}", ps[i], 8))
    got.update(run_to_completion(engine))
    assert got == ref
    assert ex.max_slots_in_use == 2  # only possible with the snapshot evicted
    _idle(engine)


def test_no_snapshots_without_prefix_caching():
    engine, ex = make_recurrent_engine(num_blocks=256, enable_prefix_caching=False)
    s = engine.scheduler
    for rid in ("x", "y"):
        s.add_request(gen_request(rid, list(range(10, 40)), 4))
        run_to_completion(engine)
    assert s.kv.state.num_snapshots_taken == 0 and ex.num_restores == 0
    assert not s.stats().enable_prefix_caching


def test_attention_only_models_keep_prefix_caching_and_take_no_slots():
    ex = FakeWorkerExecutor(64)
    engine = EngineCore(SchedulerConfig(block_size=4), ex)
    s = engine.scheduler
    assert s.kv.state is None and s.kv.enable_caching and ex.num_state_slots == 0
    prompt = list(range(10, 40))
    for rid in ("x", "y"):
        s.add_request(gen_request(rid, prompt, 4))
        run_to_completion(engine)
    assert s.kv.prefix_hits > 0


def test_state_slot_manager_refuses_double_take_and_foreign_free():
    m = StateSlotManager(2)
    a = Request("a", [1], msg.SamplingParams(), 1, frozenset(), frozenset(), 0, 0)
    b = Request("b", [1], msg.SamplingParams(), 1, frozenset(), frozenset(), 0, 1)
    m.allocate(a)
    with pytest.raises(RuntimeError, match="already holds"):
        m.allocate(a)
    b.state_slot = a.state_slot
    with pytest.raises(RuntimeError, match="does not hold"):
        m.free(b)
    m.free(a)
    m.free(a)  # nothing held: nothing to do
    assert m.num_free_slots == 2


def test_no_room_for_a_slot_is_a_startup_error():
    with pytest.raises(ValueError, match="recurrent-state slot"):
        make_recurrent_engine(num_blocks=8, slot_bytes=100)


def test_state_slots_with_torch_blocked():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from splitserve.scheduler.kv_cache_manager import KVCacheManager\n"
        "from splitserve.scheduler.cache_specs import plan_cache\n"
        "assert KVCacheManager(4, 4, True, 2).state.num_slots == 2\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_recomputed_block_replaces_a_free_duplicate_as_lookup_target():
    """A hit cut back (no state snapshot there) computes its blocks again: the new block must
    become the cache entry, or evicting the free old one would lose the prefix."""
    from splitserve.scheduler.block_pool import BlockPool

    pool = BlockPool(3)
    (old,) = pool.allocate(1)
    pool.cache_block(old, b"h")
    pool.release([old])
    (new,) = pool.allocate(1)
    assert new is not old
    pool.cache_block(new, b"h")
    assert pool.lookup(b"h") is new
    pool.release([new])
    taken = pool.allocate(2)  # evicts the two oldest free blocks: `old` among them
    assert old in taken and pool.lookup(b"h") is new


def test_a_snapshot_is_published_only_when_its_step_succeeded():
    """The snapshot waits for its step's result: a request that failed there never computed
    the state, so its snapshot is dropped (its slot freed) and the same prompt later computes
    from scratch; a successful step publishes it."""
    engine, _ = make_recurrent_engine(num_blocks=256, enable_prefix_caching=True)
    s = engine.scheduler
    prompt = list(range(10, 40))
    s.add_request(gen_request("bad", prompt, 4))
    step = s.schedule()
    assert [rid for rid, _ in step.state_snapshots] == ["bad"]
    s.add_request(gen_request("early", prompt, 4))
    early = s.schedule()  # planned before the result: the snapshot is not visible yet
    assert "early" not in {m.request_id for m in early.new_requests}
    s.update_from_output(msg.StepResult(step_id=step.step_id, errors={"bad": "boom"}))
    assert s.kv.state.num_snapshots == 0
    assert s.kv.num_free_state_slots == s.kv.num_state_slots
    s.abort_request("early")
    s.add_request(gen_request("again", prompt, 4))
    step = s.schedule()
    (new,) = step.new_requests
    assert new.request_id == "again" and new.num_computed_tokens == 0
    s.update_from_output(msg.StepResult(step_id=step.step_id))
    assert s.kv.state.num_snapshots == 1  # published: its step came back without an error
