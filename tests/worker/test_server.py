"""The worker's gRPC server, started for real on loopback and driven with the generated stubs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.entrypoints.launcher import free_port
from splitserve.protos import common_pb2, worker_pb2, worker_pb2_grpc
from splitserve.worker.config import WorkerConfig
from splitserve.worker.server import SERVICE_NAME, run_worker

DEADLINE = 60.0


class _ServerThread:
    """run_worker on its own event loop in a thread; stop() cancels it (graceful stop)."""

    def __init__(self, config: WorkerConfig, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.future = asyncio.run_coroutine_threadsafe(
            run_worker(config, address, self.ready, grace=1.0), self.loop
        )
        assert self.ready.wait(DEADLINE), "the server did not start listening"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.future.cancel)
        deadline = time.monotonic() + DEADLINE
        while not self.future.done() and time.monotonic() < deadline:
            self.thread.join(0.05)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)


def _health(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE).status


@pytest.fixture
def served(tiny_llama):
    address = f"127.0.0.1:{free_port()}"
    server = _ServerThread(WorkerConfig(model=str(tiny_llama), kv_cache_memory=1 << 20), address)
    channel = grpc.insecure_channel(address)
    yield channel
    channel.close()
    server.stop()


def test_health_describe_initialize_execute(served):
    channel = served
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
    SERVING = health_pb2.HealthCheckResponse.SERVING
    assert _health(channel) == NOT_SERVING
    described = stub.Describe(worker_pb2.DescribeRequest(block_size=4), timeout=DEADLINE)
    assert described.vocab_size == 96 and list(described.eos_token_ids) == [2, 5]
    assert described.available_kv_bytes == 1 << 20 and described.bytes_per_block > 0
    assert _health(channel) == NOT_SERVING  # loaded, but no cache yet
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Execute(iter([worker_pb2.StepRequest()]), timeout=DEADLINE))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    init = stub.InitializeCache(
        worker_pb2.InitializeCacheRequest(num_blocks=32, block_size=4), timeout=DEADLINE
    )
    assert init.seconds > 0
    assert _health(channel) == SERVING and _health(channel, SERVICE_NAME) == SERVING

    prompt = [5, 9, 13, 17, 21]
    params = common_pb2.SamplingParams(temperature=0, logprobs=2)
    steps = [
        worker_pb2.StepRequest(
            step_id=0,
            num_scheduled_tokens={"r": len(prompt)},
            new_requests=[
                worker_pb2.NewRequest(
                    request_id="r",
                    token_ids=prompt,
                    block_ids=[0, 1],
                    sampling_params=params,
                    num_prompt_tokens=len(prompt),
                )
            ],
        )
    ]
    steps += [
        worker_pb2.StepRequest(
            step_id=i,
            num_scheduled_tokens={"r": 1},
            cached_requests=[
                worker_pb2.CachedRequest(
                    request_id="r",
                    num_computed_tokens=len(prompt) + i - 1,
                    new_block_ids=[2] if i == 3 else [],
                )
            ],
        )
        for i in range(1, 5)
    ]
    steps.append(worker_pb2.StepRequest(step_id=5, finished_request_ids=["r"]))
    results = list(stub.Execute(iter(steps), timeout=DEADLINE))
    assert [r.step_id for r in results] == list(range(6))
    assert all(list(r.request_ids) == ["r"] for r in results[:5]) and not results[5].request_ids
    assert all(len(r.logprobs[0].top_token_ids) == 2 for r in results[:5])


def test_bad_describe_is_invalid_argument(served):
    stub = worker_pb2_grpc.WorkerServiceStub(served)
    with pytest.raises(grpc.RpcError) as err:
        stub.Describe(worker_pb2.DescribeRequest(block_size=0), timeout=DEADLINE)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unexpected_exception_is_internal_and_marks_unhealthy(served, monkeypatch):
    from splitserve.worker.model_runner import ModelRunner

    stub = worker_pb2_grpc.WorkerServiceStub(served)
    stub.InitializeCache(
        worker_pb2.InitializeCacheRequest(num_blocks=8, block_size=4), timeout=DEADLINE
    )

    def boom(self, step, intermediate=None):
        raise KeyError("synthetic failure")

    monkeypatch.setattr(ModelRunner, "execute", boom)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Execute(iter([worker_pb2.StepRequest(step_id=3)]), timeout=DEADLINE))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "synthetic failure" in err.value.details()
    assert _health(served) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_unix_socket_and_sigterm(tiny_llama, tmp_path):
    sock = tmp_path / "worker.sock"
    code = (
        "import asyncio, sys\n"
        "from splitserve.worker.config import WorkerConfig\n"
        "from splitserve.worker.server import run_worker\n"
        f"asyncio.run(run_worker(WorkerConfig(model={str(tiny_llama)!r}, "
        f"kv_cache_memory=1 << 20), 'unix:{sock}', grace=1.0))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    try:
        channel = grpc.insecure_channel(f"unix:{sock}")
        grpc.channel_ready_future(channel).result(timeout=DEADLINE)
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        stub.InitializeCache(
            worker_pb2.InitializeCacheRequest(num_blocks=8, block_size=4), timeout=DEADLINE
        )
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
