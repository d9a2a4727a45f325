"""Pooling requests in the scheduler: prompt-only chunks within the token budget, finished
by the pooled result (truncated and normalized here), blocks freed, runner mismatches and
matryoshka rules refused, no prefix-cache hits for MEAN pooling."""

from __future__ import annotations

import numpy as np
import pytest

from splitserve.common import messages as msg
from splitserve.protos import common_pb2
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.scheduler import RequestRejected, Scheduler

STOP = common_pb2.FinishReason.FINISH_REASON_STOP


def make(pooling_type="LAST", **info) -> Scheduler:
    runner = common_pb2.RunnerInfo(
        runner="pooling", pooling_type=pooling_type, normalize=True, hidden_size=4, **info
    )
    config = SchedulerConfig(block_size=4, max_num_batched_tokens=8)
    return Scheduler(config, 32, 32, 1000, [2], runner_info=runner)


def embed(rid, prompt, **kw) -> msg.GenerateRequest:
    return msg.GenerateRequest(request_id=rid, prompt_token_ids=prompt, pooling=True, **kw)


def test_chunks_then_finishes_on_the_pooled_state():
    s = make()
    s.add_request(embed("a", list(range(10, 30))))  # 20 tokens: chunks of 8, 8, 4
    chunks = []
    while (step := s.schedule()) is not None:
        chunks.append(step.num_scheduled_tokens["a"])
        assert not s.update_from_output(msg.StepResult(step_id=step.step_id))
    assert chunks == [8, 8, 4]
    result = msg.StepResult(step_id=99)
    result.pooled.append(msg.PooledOutput("a", [3.0, 4.0, 0.0, 0.0]))
    (out,) = s.update_from_output(result)
    assert out.finish_reason == STOP and out.num_prompt_tokens == 20
    assert out.embedding == pytest.approx([0.6, 0.8, 0.0, 0.0])
    assert not s.has_unfinished
    assert s.kv.num_free_blocks == 32


def test_whole_context_prompt_and_limits():
    s = make()
    s.add_request(embed("full", [5] * 32))  # no output token needs room
    with pytest.raises(RequestRejected, match="33 tokens but the maximum context length is 32"):
        s.add_request(embed("long", [5] * 33))
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        s.add_request(embed("oov", [1000]))


def test_runner_mismatch_is_refused():
    s = make()
    with pytest.raises(RequestRejected, match="--runner pooling and serves only embeddings"):
        s.add_request(msg.GenerateRequest(request_id="g", prompt_token_ids=[1, 2]))
    generate = Scheduler(SchedulerConfig(block_size=4), 32, 32, 1000, [2])
    with pytest.raises(RequestRejected, match="does not support the Embeddings API"):
        generate.add_request(embed("e", [1, 2]))


def test_dimensions_need_matryoshka():
    with pytest.raises(RequestRejected, match="does not support matryoshka"):
        make().add_request(embed("d", [1, 2], dimensions=2))
    s = make(is_matryoshka=True)
    s.add_request(embed("d", [1, 2], dimensions=2))
    step = s.schedule()
    result = msg.StepResult(step_id=step.step_id)
    result.pooled.append(msg.PooledOutput("d", [0.0, 2.0, 9.0, 9.0]))
    (out,) = s.update_from_output(result)
    assert np.allclose(out.embedding, [0.0, 1.0])
    # normalize=False per request: truncated, not normalized.
    s.add_request(embed("raw", [1, 2], dimensions=3, normalize=False))
    step = s.schedule()
    result = msg.StepResult(step_id=step.step_id)
    result.pooled.append(msg.PooledOutput("raw", [0.0, 2.0, 9.0, 9.0]))
    (out,) = s.update_from_output(result)
    assert out.embedding == [0.0, 2.0, 9.0]


@pytest.mark.parametrize("pooling_type, hit", [("LAST", 8), ("MEAN", 0)])
def test_prefix_cache_hits_only_for_last_pooling(pooling_type, hit):
    s = make(pooling_type)
    prompt = list(range(10, 20))
    for rid in ("first", "second"):
        s.add_request(embed(rid, prompt))
        while (step := s.schedule()) is not None:
            s.update_from_output(msg.StepResult(step_id=step.step_id))
        result = msg.StepResult()
        result.pooled.append(msg.PooledOutput(rid, [1.0, 0, 0, 0]))
        (out,) = s.update_from_output(result)
    assert out.num_cached_tokens == hit


def test_ranks_with_different_runners_are_refused():
    from splitserve.scheduler.engine_core import EngineCore

    from .fake_worker import FakeWorkerExecutor

    class Mixed(FakeWorkerExecutor):
        def describe(self, block_size, engine=None):
            ranks = super().describe(block_size, engine)
            ranks[-1].runner_info.runner = "pooling"
            return ranks

    with pytest.raises(ValueError, match=r"different runners .*\['generate', 'pooling'\]"):
        EngineCore(SchedulerConfig(block_size=4), Mixed(32, pipeline_parallel_size=2))
