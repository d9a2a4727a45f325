"""The scheduler's gRPC service over the fake worker, on a loopback port."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.entrypoints.launcher import free_port
from splitserve.protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.server import run_scheduler

from .fake_worker import FakeWorkerExecutor
from .utils import gen_request_proto

NUM_BLOCKS = 64


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def scheduler_addr():
    addr = f"127.0.0.1:{free_port()}"
    config = SchedulerConfig(block_size=4, max_model_len=512, max_waiting_requests=4)
    loop = asyncio.new_event_loop()
    stop = {}

    def run():
        asyncio.set_event_loop(loop)
        task = loop.create_task(
            run_scheduler(
                config,
                addr,
                executor_factory=lambda: FakeWorkerExecutor(
                    NUM_BLOCKS, max_model_len=1024, step_seconds=0.01
                ),
            )
        )
        stop["task"] = task
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ch = grpc.insecure_channel(addr)
    hs = health_pb2_grpc.HealthStub(ch)

    def serving():
        try:
            return (
                hs.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        except grpc.RpcError:
            return False

    wait_for(serving, what="scheduler SERVING")
    yield addr
    loop.call_soon_threadsafe(stop["task"].cancel)
    t.join(10)
    ch.close()


@pytest.fixture
def stub(scheduler_addr):
    ch = grpc.insecure_channel(scheduler_addr)
    yield scheduler_pb2_grpc.SchedulerServiceStub(ch)
    ch.close()


def stats(stub):
    return stub.GetStats(scheduler_pb2.GetStatsRequest())


def test_generate_streams_tokens_until_length(stub):
    msgs = list(stub.Generate(gen_request_proto("g1", [5, 6, 7], 5)))
    assert sum(len(m.token_ids) for m in msgs) == 5
    assert msgs[-1].finish_reason == 2 and msgs[0].num_prompt_tokens == 3
    info = stub.GetModelInfo(scheduler_pb2.GetModelInfoRequest())
    assert info.max_model_len == 512 and info.vocab_size == 1000


def test_generate_sends_heartbeats_only_when_asked(stub):
    """Empty responses between a request's tokens (the fake worker takes 10 ms a step) when
    the caller asks for them, so it tells a quiet request from a stalled scheduler."""
    plain = list(stub.Generate(gen_request_proto("hb-off", [5, 6, 7], 40)))
    assert all(m.ByteSize() for m in plain)
    req = gen_request_proto("hb-on", [5, 6, 7], 40)
    req.heartbeat_interval_s = 0.002
    msgs = list(stub.Generate(req))
    beats = [m for m in msgs if not m.ByteSize()]
    assert beats, "no heartbeat in 40 steps of 10 ms at a 2 ms interval"
    assert sum(len(m.token_ids) for m in msgs) == 40
    assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_cancel_mid_stream_frees_blocks(stub):
    idle = stats(stub).num_free_blocks
    assert idle == NUM_BLOCKS
    call = stub.Generate(gen_request_proto("c1", list(range(5, 40)), 400))
    next(call)
    next(call)
    assert stats(stub).num_free_blocks < idle
    call.cancel()
    wait_for(
        lambda: stats(stub).num_free_blocks == idle and stats(stub).num_running == 0,
        what="blocks freed after cancel",
    )


def test_abort_rpc_ends_stream(stub):
    call = stub.Generate(gen_request_proto("a1", [5, 6, 7], 400), timeout=30)
    next(call)
    assert stub.Abort(scheduler_pb2.AbortRequest(request_id="a1")).aborted
    # The Generate call ends (its last message says ABORT) instead of waiting forever.
    last = list(call)[-1]
    assert last.finish_reason == common_pb2.FinishReason.FINISH_REASON_ABORT
    assert call.code() == grpc.StatusCode.OK
    wait_for(lambda: stats(stub).num_free_blocks == NUM_BLOCKS, what="blocks freed")
    assert not stub.Abort(scheduler_pb2.AbortRequest(request_id="nope")).aborted


def test_bad_requests_get_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(gen_request_proto("b1", list(range(5, 500)), 100)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "495" in e.value.details() and "512" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(gen_request_proto("b2", [5, 5000], 1)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stats(stub).num_free_blocks == NUM_BLOCKS


def test_reflection_describes_the_public_api(scheduler_addr):
    """A client with no stubs (grpcurl) discovers Generate through server reflection."""
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(scheduler_addr) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"splitserve.scheduler.v1.SchedulerService", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(db)
        generate = pool.FindServiceByName(
            "splitserve.scheduler.v1.SchedulerService"
        ).FindMethodByName("Generate")
        assert generate.server_streaming and not generate.client_streaming
        assert generate.input_type.full_name == "splitserve.scheduler.v1.GenerateRequest"
        # The sampling parameters come from common.proto, served as a dependency.
        sp = generate.input_type.fields_by_name["sampling_params"].message_type
        assert sp.full_name == "splitserve.common.v1.SamplingParams"
        assert "max_tokens" in sp.fields_by_name
