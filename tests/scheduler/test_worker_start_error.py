"""A worker that answers but cannot serve (its model failed to load) stops the scheduler's
start-up with one line naming the rank, its address and the worker's reason."""

from __future__ import annotations

import asyncio
import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from splitserve.entrypoints.launcher import free_port
from splitserve.protos import worker_pb2_grpc
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.server import run_scheduler

REASON = "the model failed to load: ImportError: cannot import name 'X' from 'kernels'"


class BrokenWorker(worker_pb2_grpc.WorkerServiceServicer):
    def Describe(self, request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, REASON)


def test_scheduler_exits_1_naming_the_worker_that_cannot_serve(caplog):
    worker_addr = f"127.0.0.1:{free_port()}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(BrokenWorker(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(worker_addr)
    server.start()
    try:
        config = SchedulerConfig(worker_addresses=[worker_addr], block_size=4)
        with caplog.at_level(logging.ERROR, logger="splitserve.scheduler.server"):
            code = asyncio.run(
                asyncio.wait_for(run_scheduler(config, f"127.0.0.1:{free_port()}"), 60)
            )
    finally:
        server.stop(0)
    assert code == 1
    errors = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("splitserve.scheduler")
    ]
    assert [r.getMessage() for r in errors] == [
        f"worker rank 0 at {worker_addr} cannot serve: {REASON}"
    ]
    assert errors[0].exc_info is None
