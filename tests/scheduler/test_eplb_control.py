"""EPLB's control from the scheduler (torch-free): every step_interval-th model step is marked
`rebalance_experts`, the ranks must agree on the interval, and the last stage's reports reach
the scheduler's stats."""

from __future__ import annotations

import pytest

from splitserve.common import messages as msg
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.engine_core import EngineCore

from .fake_worker import FakeWorkerExecutor


class EplbWorkers(FakeWorkerExecutor):
    """Fake ranks stating EPLB intervals, answering each marked step with a report."""

    def __init__(self, intervals: list[int], **kw) -> None:
        super().__init__(64, pipeline_parallel_size=len(intervals), **kw)
        self.intervals = intervals
        self.reports = 0

    def describe(self, block_size, engine=None):
        ranks = super().describe(block_size, engine)
        for rank, interval in zip(ranks, self.intervals, strict=True):
            rank.eplb_step_interval = interval
        return ranks

    def get_result(self) -> msg.StepResult:
        step = self.steps[len(self.steps) - len(self._results)]
        result = super().get_result()
        if step.rebalance_experts:
            self.reports += 1
            result.eplb = msg.EplbReport(self.reports, 0.5, 0.75 + self.reports / 100, 1, 2)
        return result


def _run(engine: EngineCore, n: int) -> None:
    for i in range(n):
        sp = msg.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        req = msg.GenerateRequest(
            request_id=f"r{i}", prompt_token_ids=[5, 6, 7], sampling_params=sp
        )
        engine.scheduler.add_request(req)
    while engine.has_work:
        engine.step()


def test_every_interval_th_model_step_rebalances_and_stats_follow():
    workers = EplbWorkers([3])
    engine = EngineCore(SchedulerConfig(block_size=4), workers)
    assert engine.eplb_step_interval == 3
    stats = engine.stats()
    assert stats.HasField("eplb_num_rebalances") and stats.eplb_num_rebalances == 0
    _run(engine, 4)
    model_steps = [s for s in workers.steps if s.num_scheduled_tokens]
    marked = [i for i, s in enumerate(model_steps, 1) if s.rebalance_experts]
    assert marked == list(range(3, len(model_steps) + 1, 3)) and marked
    assert not any(s.rebalance_experts for s in workers.steps if not s.num_scheduled_tokens)
    stats = engine.stats()
    assert stats.eplb_num_rebalances == len(marked) == workers.reports
    assert stats.eplb_balancedness == pytest.approx(0.75 + len(marked) / 100)


def test_without_eplb_no_step_is_marked_and_stats_say_nothing():
    workers = EplbWorkers([0])
    engine = EngineCore(SchedulerConfig(block_size=4), workers)
    _run(engine, 2)
    assert not any(s.rebalance_experts for s in workers.steps)
    assert not engine.stats().HasField("eplb_num_rebalances")


def test_ranks_that_disagree_on_eplb_are_refused():
    with pytest.raises(ValueError, match=r"disagree on EPLB .*\[3, 0\]"):
        EngineCore(SchedulerConfig(block_size=4), EplbWorkers([3, 0]))
