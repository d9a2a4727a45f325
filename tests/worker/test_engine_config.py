"""A real worker and a real scheduler, on loopback, agree on the engine fields at start: the
scheduler refuses a worker with a conflicting fixed value (naming both), takes a worker's value
for a field it left at its default, and the worker's memory profile runs with the agreed
max_num_batched_tokens."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import grpc
import pytest

from splitserve.common import engine_config
from splitserve.common.engine_config import EngineConfigConflict
from splitserve.entrypoints.launcher import free_port
from splitserve.protos import scheduler_pb2, scheduler_pb2_grpc
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.server import run_scheduler
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_runner import ModelRunner

from .test_server import DEADLINE, _ServerThread


@pytest.fixture
def worker(tiny_llama, request):
    """A worker server on loopback with the test's WorkerConfig keywords (`indirect`)."""
    address = f"127.0.0.1:{free_port()}"
    config = WorkerConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, **request.param)
    server = _ServerThread(config, address)
    yield address
    server.stop()


@pytest.mark.parametrize("worker", [{"max_num_batched_tokens": 8192}], indirect=True)
def test_scheduler_refuses_a_worker_with_a_conflicting_field(worker, caplog):
    config = SchedulerConfig(worker_addresses=[worker], block_size=4, max_num_batched_tokens=4096)
    with caplog.at_level(logging.ERROR, logger="splitserve.scheduler.server"):
        code = asyncio.run(
            asyncio.wait_for(run_scheduler(config, f"127.0.0.1:{free_port()}"), DEADLINE)
        )
    assert code == 1
    errors = [r for r in caplog.records if r.name == "splitserve.scheduler.server"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert (
        errors[0]
        .getMessage()
        .startswith("max_num_batched_tokens: scheduler 4096, worker rank 0 8192 (")
    )


@pytest.mark.parametrize("worker", [{"max_num_batched_tokens": 1024}], indirect=True)
def test_scheduler_takes_the_workers_value_for_a_field_it_left_at_its_default(worker):
    config = SchedulerConfig(worker_addresses=[worker], block_size=4, max_num_seqs=8)
    address = f"127.0.0.1:{free_port()}"
    loop = asyncio.new_event_loop()
    task = loop.create_task(run_scheduler(config, address))

    def run() -> None:
        # Cancelling the task is how the test stops it (no signals off the main thread).
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        with grpc.insecure_channel(address) as channel:
            info = _model_info_once_started(scheduler_pb2_grpc.SchedulerServiceStub(channel))
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(DEADLINE)
    # The worker's flag reached the scheduler, and the scheduler's reached the worker.
    assert info.engine.max_num_batched_tokens == 1024
    assert info.engine.max_num_seqs == 8
    assert config.max_num_batched_tokens == 1024


def _model_info_once_started(stub) -> scheduler_pb2.ModelInfo:
    """GetModelInfo, once the scheduler has met its workers (UNAVAILABLE until then)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            return stub.GetModelInfo(
                scheduler_pb2.GetModelInfoRequest(), timeout=5, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _scheduler_engine(**kwargs):
    return engine_config.to_proto(
        engine_config.engine_values(SchedulerConfig(**kwargs), "scheduler")
    )


def test_worker_profiles_with_the_agreed_max_num_batched_tokens(tiny_llama, monkeypatch):
    runner = ModelRunner(WorkerConfig(model=str(tiny_llama), kv_cache_memory=1 << 20))
    described = runner.describe(16, _scheduler_engine(max_num_batched_tokens=96, max_num_seqs=4))
    assert described.engine.max_num_batched_tokens == 96
    # Every field it runs with is fixed, but an unset max_model_len (the model's length).
    assert set(described.engine.fixed_fields) == set(runner.config.ENGINE_FIELDS) - {
        "max_model_len"
    }
    seen = []
    forward = type(runner.model).forward

    def spy(model, input_ids, *args, **kwargs):
        seen.append(input_ids.shape[0])
        return forward(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(runner.model), "forward", spy)
    runner.profile_forward()
    assert seen == [96]


def test_worker_refuses_a_conflicting_field_and_a_length_past_its_model(tiny_llama):
    runner = ModelRunner(
        WorkerConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, max_num_seqs=16)
    )
    with pytest.raises(EngineConfigConflict, match="max_num_seqs: scheduler 32, worker rank 0 16"):
        runner.describe(16, _scheduler_engine(max_num_seqs=32))
    # tiny_llama's context is 256 positions.
    with pytest.raises(
        EngineConfigConflict, match="max_model_len: scheduler 4096, worker rank 0 256"
    ):
        runner.describe(16, _scheduler_engine(max_model_len=4096))
    assert runner.describe(16, _scheduler_engine(max_model_len=128)).max_model_len == 128
