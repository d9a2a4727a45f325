"""--scheduling-policy, --async-scheduling and the periodic stats line (--disable-log-stats)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.scheduler import RequestRejected
from splitserve.scheduler.stats_logger import StatsLogger, start_stats_logging, stats_interval_s

from .utils import gen_request, make_engine, run_to_completion


def _prio(rid: str, prompt: list[int], priority: int, max_tokens: int = 4):
    req = gen_request(rid, prompt, max_tokens)
    req.priority = priority
    return req


def _admission_order(engine) -> list[str]:
    order: list[str] = []

    def seen(e):
        for r in e.scheduler.running:
            if r.request_id not in order:
                order.append(r.request_id)

    run_to_completion(engine, on_step=seen)
    return order


def test_fcfs_is_the_default_and_refuses_priorities():
    engine, _ = make_engine(max_num_seqs=1)
    assert engine.config.scheduling_policy == "fcfs"
    with pytest.raises(RequestRejected) as exc:
        engine.scheduler.add_request(_prio("a", [1, 2, 3], 5))
    assert exc.value.code == "INVALID_ARGUMENT"
    assert "--scheduling-policy priority" in exc.value.message
    assert "a" not in engine.scheduler.requests
    for rid in ("x", "y", "z"):
        engine.scheduler.add_request(_prio(rid, [1, 2, 3], 0))
    assert _admission_order(engine) == ["x", "y", "z"]


def test_priority_policy_runs_lower_values_first():
    engine, _ = make_engine(max_num_seqs=1, scheduling_policy="priority")
    for rid, prio in (("late", 5), ("urgent", -1), ("mid", 2), ("mid2", 2)):
        engine.scheduler.add_request(_prio(rid, [1, 2, 3], prio))
    assert _admission_order(engine) == ["urgent", "mid", "mid2", "late"]


def test_priority_policy_preempts_the_highest_value_first():
    # 6 blocks of 4 tokens: two 8-token prompts fit, their growth forces a preemption.
    engine, _ = make_engine(num_blocks=6, scheduling_policy="priority", async_scheduling_depth=1)
    s = engine.scheduler
    s.add_request(_prio("low", list(range(1, 9)), 9, max_tokens=12))
    s.add_request(_prio("high", list(range(11, 19)), 0, max_tokens=12))
    preempted: list[str] = []
    original = s._preempt

    def spy(req):
        preempted.append(req.request_id)
        original(req)

    s._preempt = spy
    got = run_to_completion(engine)
    assert preempted and set(preempted) == {"low"}
    assert len(got["low"][0]) == len(got["high"][0]) == 12
    assert s.kv.num_free_blocks == 6


def test_scheduling_policy_checked():
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority"):
        SchedulerConfig(scheduling_policy="lifo")


@pytest.mark.parametrize(
    ("flags", "depth"),
    [({}, 2), ({"async_scheduling": True}, 2), ({"async_scheduling": False}, 1)],
)
def test_async_scheduling_alias(flags, depth):
    assert SchedulerConfig(**flags).async_scheduling_depth == depth


@pytest.mark.parametrize(
    "flags",
    [
        {"async_scheduling": True, "async_scheduling_depth": 1},
        {"async_scheduling": False, "async_scheduling_depth": 3},
    ],
)
def test_async_scheduling_contradictions(flags):
    with pytest.raises(ValueError, match="contradicts"):
        SchedulerConfig(**flags)


def test_stats_line_counts_the_interval():
    engine, _ = make_engine(num_blocks=32)
    now = [100.0]
    stats = StatsLogger(engine.scheduler, clock=lambda: now[0])
    for i in range(2):
        engine.scheduler.add_request(gen_request(f"r{i}", list(range(1, 9)), 5))
    run_to_completion(engine)
    now[0] += 2.0
    message, active = stats.line()
    assert active
    # 2 x 5 sampled tokens over 2 s; of the two 8-token prompts, the second found its first
    # block (4 tokens; the last token is always computed) in the prefix cache: 12 computed.
    assert "Avg prompt throughput: 6.0 tokens/s" in message
    assert "Avg generation throughput: 5.0 tokens/s" in message
    assert "Running: 0 reqs, Waiting: 0 reqs" in message
    assert "Prefix cache hit rate: 25.0%" in message
    now[0] += 10.0
    message, active = stats.line()
    assert not active and "Avg generation throughput: 0.0 tokens/s" in message


def test_stats_interval_env(monkeypatch):
    monkeypatch.delenv("VLLM_LOG_STATS_INTERVAL", raising=False)
    assert stats_interval_s() == 10.0
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "2.5")
    assert stats_interval_s() == 2.5
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="VLLM_LOG_STATS_INTERVAL"):
        stats_interval_s()


def test_stats_logging_on_by_default_and_disabled_by_flag(caplog):
    caplog.set_level(logging.DEBUG, logger="splitserve.scheduler.stats")
    engine, _ = make_engine()

    def stats_lines() -> list[str]:
        # NOTE: only the stats logger's records: an earlier test's task garbage-collected
        # now can log asyncio's "Task was destroyed" into caplog first.
        return [r.getMessage() for r in caplog.records if r.name == "splitserve.scheduler.stats"]

    async def main():
        assert (
            start_stats_logging(SchedulerConfig(disable_log_stats=True), engine.scheduler) is None
        )
        task = start_stats_logging(engine.config, engine.scheduler, interval_s=0.01)
        assert task is not None
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while not stats_lines():
                assert asyncio.get_running_loop().time() < deadline, "no stats line logged"
                await asyncio.sleep(0.01)
        finally:
            task.cancel()

    asyncio.run(main())
    assert stats_lines()[0].startswith("Avg prompt throughput:")
