"""The step loop shared by the scheduler service and the in-process engine.

An executor runs steps on the workers in order. With one pipeline rank the loop keeps up to
`async_scheduling_depth` steps outstanding, so the next step is planned and sent while the
current one computes. With P > 1 ranks (learned from Describe) it keeps up to P steps
outstanding, micro-batches of disjoint requests, so every stage has one to work on; see
`Scheduler.pipeline_parallel_size`.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Protocol

from splitserve.common import engine_config
from splitserve.common import messages as msg
from splitserve.protos import common_pb2, scheduler_pb2, worker_pb2

from .cache_specs import CachePlan, plan_cache
from .config import SchedulerConfig
from .scheduler import RequestOutput, Scheduler

logger = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs steps on the pipeline ranks; results come back in submission order. Steps and
    results are `messages` dataclasses: an executor that crosses gRPC converts them itself."""

    def describe(
        self, block_size: int, engine: common_pb2.EngineConfig
    ) -> list[worker_pb2.DescribeResponse]: ...

    def initialize_cache(
        self, num_blocks: int, block_size: int, num_state_slots: int = 0
    ) -> None: ...

    def submit(self, step: msg.StepRequest) -> None: ...

    def get_result(self) -> msg.StepResult: ...

    def shutdown(self) -> None: ...


def plan_kv_cache(
    config: SchedulerConfig, ranks: list[worker_pb2.DescribeResponse]
) -> tuple[CachePlan, int]:
    """(blocks and state slots, max_model_len) from the ranks' cache specs, memory profiles
    and model limits."""
    model_len = min(r.max_model_len for r in ranks)
    if config.max_model_len is not None:
        if config.max_model_len > model_len:
            raise ValueError(
                f"max_model_len ({config.max_model_len}) is larger than the model's context "
                f"length ({model_len})"
            )
        model_len = config.max_model_len
    plan = plan_cache(
        ranks,
        config.max_num_seqs,
        model_len,
        config.block_size,
        block_override=config.num_gpu_blocks_override,
    )
    return plan, int(model_len)


def agree_with_ranks(
    config: SchedulerConfig, ranks: list[worker_pb2.DescribeResponse]
) -> engine_config.EngineValues:
    """The engine fields the scheduler and every rank agree on (the scheduler takes a rank's
    value for a field it left at its default); `config` takes them. Raises
    EngineConfigConflict naming the field and both values."""
    agreed = engine_config.engine_values(config, "scheduler")
    for r in ranks:
        # A rank answers with the values it runs with: all fixed.
        agreed = engine_config.agree(
            agreed, engine_config.from_proto(r.engine, f"worker rank {r.rank}").all_fixed()
        )
    engine_config.adopt(config, agreed)
    return agreed


def check_ranks(ranks: list[worker_pb2.DescribeResponse]) -> int:
    """The pipeline size, after checking the workers form one pipeline, rank 0 first."""
    size = len(ranks)
    got = [(r.rank, r.world_size) for r in ranks]
    if got != [(i, size) for i in range(size)]:
        raise ValueError(
            f"the {size} worker address(es) must be pipeline ranks 0..{size - 1} of a "
            f"pipeline of {size}, in order; they answered (rank, size) = {got}"
        )
    return size


class EngineCore:
    """Owns the scheduler and an executor; `step()` advances the whole batch by one result."""

    def __init__(self, config: SchedulerConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        own = engine_config.engine_values(config, "scheduler")
        ranks = executor.describe(config.block_size, engine_config.to_proto(own))
        self.pipeline_parallel_size = check_ranks(ranks)
        self.engine = agree_with_ranks(config, ranks)
        """The engine fields agreed with the workers (`config` holds them too)."""
        runners = [r.runner_info.runner or "generate" for r in ranks]
        if len(set(runners)) > 1:  # started by hand with different --runner flags
            raise ValueError(f"the pipeline ranks run different runners (--runner): {runners}")
        plan, self.max_model_len = plan_kv_cache(config, ranks)
        self.num_blocks, self.num_state_slots = plan.num_blocks, plan.num_state_slots
        self.sliding_window = plan.sliding_window
        """Every attention layer's window (blocks out of it are released early), or None."""
        last = ranks[-1]
        self.model_info = scheduler_pb2.ModelInfo(
            max_model_len=self.max_model_len,
            vocab_size=last.vocab_size,
            eos_token_ids=list(last.eos_token_ids),
            model=last.model,
            max_logprobs=config.max_logprobs,
            sampling_defaults=last.sampling_defaults,
            runner_info=last.runner_info,
            engine=engine_config.to_proto(self.engine.all_fixed()),
        )
        logger.info(
            "KV cache: %d blocks of %d tokens; max_model_len %d",
            self.num_blocks,
            config.block_size,
            self.max_model_len,
        )
        if self.num_state_slots:
            logger.info("recurrent state: %d slots (one per running request)", self.num_state_slots)
            executor.initialize_cache(self.num_blocks, config.block_size, self.num_state_slots)
        else:  # NOTE: executors of attention-only models may take two arguments
            executor.initialize_cache(self.num_blocks, config.block_size)
        self.scheduler = Scheduler(
            config,
            self.num_blocks,
            self.max_model_len,
            last.vocab_size,
            list(last.eos_token_ids),
            pipeline_parallel_size=self.pipeline_parallel_size,
            runner_info=last.runner_info if last.HasField("runner_info") else None,
            num_state_slots=self.num_state_slots,
            sliding_window=self.sliding_window,
        )
        self.max_inflight = (
            self.pipeline_parallel_size
            if self.pipeline_parallel_size > 1
            else config.async_scheduling_depth
        )
        """Steps outstanding at most: P micro-batches, or the async depth with one rank."""
        self._inflight: deque[msg.StepRequest] = deque()
        intervals = [r.eplb_step_interval for r in ranks]
        if len(set(intervals)) > 1:  # started by hand with different EPLB flags
            raise ValueError(
                f"the pipeline ranks disagree on EPLB (--enable-eplb, --eplb-config "
                f"step_interval; 0: off): {intervals}"
            )
        self.eplb_step_interval = intervals[0]
        """EPLB on the workers (--enable-eplb): every this many model steps, one is marked
        `rebalance_experts`, a step boundary at which every rank re-places its experts; 0: off."""
        self._model_steps = 0
        self.eplb_report: msg.EplbReport | None = None
        """The last rebalance the last stage reported."""

    @property
    def has_work(self) -> bool:
        return (
            self.scheduler.has_unfinished
            or bool(self._inflight)
            or self.scheduler.has_release_pending
        )

    def step(self) -> list[RequestOutput]:
        """Fill the pipeline, then wait for the oldest step and apply its result."""
        while len(self._inflight) < self.max_inflight:
            step = self.scheduler.schedule()
            if step is None:
                # NOTE: with nothing to run, ended requests are still released on the workers.
                step = self.scheduler.release_step()
                if step is None:
                    break
            elif self.eplb_step_interval:
                self._model_steps += 1
                step.rebalance_experts = self._model_steps % self.eplb_step_interval == 0
            self.executor.submit(step)
            self._inflight.append(step)
        if not self._inflight:
            return []
        sent = self._inflight.popleft()
        result = self.executor.get_result()
        if result.step_id != sent.step_id:
            raise RuntimeError(f"worker answered step {result.step_id}, expected {sent.step_id}")
        if result.eplb is not None:
            self.eplb_report = result.eplb
        return self.scheduler.update_from_output(result)

    def stats(self) -> scheduler_pb2.SchedulerStats:
        """The scheduler's counters, plus EPLB's figures when it is on."""
        stats = self.scheduler.stats()
        if self.eplb_step_interval:
            report = self.eplb_report
            stats.eplb_num_rebalances = report.num_rebalances if report else 0
            # NOTE: before the first rebalance nothing has been measured; 0 says so.
            stats.eplb_balancedness = report.balancedness_after if report else 0.0
        return stats

    def shutdown(self) -> None:
        self.executor.shutdown()
