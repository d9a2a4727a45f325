"""Executor over gRPC: every pipeline rank gets each step; the last rank's result counts.

The scheduler sends each step to every rank itself rather than to rank 0 for relaying: every
rank needs the step's block tables for its own slice of the KV cache, and a relay would put
a serial hop in front of every stage. Hidden states travel between ranks over
torch.distributed, not through here; the tokens the last rank samples come back here and
reach the other ranks in a later step (`CachedRequest.new_token_ids`).

The last rank's stream carries the results; the engine thread reads it itself in
`get_result` (a reader thread in between would cost a thread handoff on every step). The
other ranks answer each step with its id once their part is done; a thread per rank drains
those answers, and when a rank's stream breaks it cancels the last rank's stream, so
`get_result` raises WorkerDied instead of waiting on a pipeline that lost a stage. A rank that
is alive but stalled (stopped, stuck in a collective) breaks nothing, so a watchdog thread
cancels the streams when `get_result` has waited `step_timeout_s` without a result (it looks
a few times a second; a gRPC stream's next() takes no timeout). Blocking calls: the engine
loop runs in its own thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from splitserve.common import messages as msg
from splitserve.common.engine_config import EngineConfigConflict
from splitserve.common.messages_proto import step_request_to_proto, step_result_from_proto
from splitserve.protos import common_pb2, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

_END = object()


class WorkerDied(RuntimeError):
    """A worker's Execute stream broke: the engine cannot go on."""


class WorkerStartError(RuntimeError):
    """A worker answered but cannot serve (its model failed to load, say): the scheduler
    cannot start. The message names the rank, its address and the worker's reason."""


class GrpcExecutor:
    def __init__(
        self,
        addresses: list[str],
        connect_timeout_s: float = 600.0,
        step_timeout_s: float = 300.0,
    ) -> None:
        self.addresses = addresses
        self.step_timeout_s = step_timeout_s
        self._channels = [
            grpc.insecure_channel(
                a,
                options=[
                    ("grpc.max_send_message_length", 256 << 20),
                    ("grpc.max_receive_message_length", 256 << 20),
                ],
            )
            for a in addresses
        ]
        self._stubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in self._channels]
        self._wait_ready(connect_timeout_s)
        self._queues: list[queue.Queue] = []
        self._streams = []
        self._failure: str | None = None
        """Why the steps stopped (a non-last rank's stream ended, the watchdog, shutdown)."""
        self._waiting_since: float | None = None
        """When `get_result` began waiting for the result it waits for; None: not waiting."""

    def _wait_ready(self, timeout_s: float) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        for addr, ch in zip(self.addresses, self._channels):
            health = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    # Serving or not: the process is up and answering; Describe works once
                    # the weights are loaded, which the worker does before it listens.
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    break
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"worker at {addr} did not answer: {exc}") from exc
                    time.sleep(0.2)

    def describe(
        self, block_size: int, engine: common_pb2.EngineConfig
    ) -> list[worker_pb2.DescribeResponse]:
        answers = []
        request = worker_pb2.DescribeRequest(block_size=block_size, engine=engine)
        for rank, (addr, stub) in enumerate(zip(self.addresses, self._stubs)):
            try:
                answers.append(stub.Describe(request, timeout=600))
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # The rank refused the scheduler's engine fields; its reason names both.
                    raise EngineConfigConflict(exc.details()) from None
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                raise WorkerStartError(
                    f"worker rank {rank} at {addr} cannot serve: {exc.details()}"
                ) from None
        return answers

    def initialize_cache(self, num_blocks: int, block_size: int, num_state_slots: int = 0) -> None:
        req = worker_pb2.InitializeCacheRequest(
            num_blocks=num_blocks, block_size=block_size, num_state_slots=num_state_slots
        )
        for s in self._stubs:
            s.InitializeCache(req, timeout=1800)
        for s in self._stubs:
            q: queue.Queue = queue.Queue()
            self._queues.append(q)
            self._streams.append(s.Execute(iter(q.get, _END)))
        for rank, stream in enumerate(self._streams[:-1]):
            threading.Thread(
                target=self._drain, args=(rank, stream), name=f"rank{rank}-acks", daemon=True
            ).start()
        threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """Cancel every stream once `get_result` has waited `step_timeout_s` for a result."""
        period = min(0.25, self.step_timeout_s / 8)
        while self._failure is None:
            time.sleep(period)
            since = self._waiting_since
            if since is None or time.monotonic() - since <= self.step_timeout_s:
                continue
            self._failure = (
                f"no step result from the workers within {self.step_timeout_s:g}s "
                "(--worker-step-timeout-s): a worker rank is stalled"
            )
            logger.error("%s", self._failure)
            for stream in self._streams:
                stream.cancel()
            return

    def _drain(self, rank: int, stream) -> None:
        """Consume a non-last rank's per-step answers; on a break, stop the last rank's."""
        try:
            for _ in stream:
                pass
            reason = "its step stream ended"
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._failure == "shutdown":
                return
            reason = f"{exc.code().name}: {exc.details()}"
        if self._failure is None:
            self._failure = f"pipeline rank {rank} ({self.addresses[rank]}) failed: {reason}"
            logger.error("%s", self._failure)
            self._streams[-1].cancel()

    def submit(self, step: msg.StepRequest) -> None:
        # The gRPC edge: one message, built once, goes to every rank.
        proto = step_request_to_proto(step)
        for q in self._queues:
            q.put(proto)

    def get_result(self) -> msg.StepResult:
        self._waiting_since = time.monotonic()
        try:
            item = next(self._streams[-1])  # the last rank's: the results
        except (StopIteration, grpc.RpcError) as exc:
            if self._failure is not None:
                raise WorkerDied(self._failure) from exc
            why = exc if isinstance(exc, grpc.RpcError) else "the worker closed it"
            raise WorkerDied(f"the last pipeline rank's step stream ended: {why}") from exc
        finally:
            self._waiting_since = None
        return step_result_from_proto(item)

    def shutdown(self) -> None:
        if self._failure is None:
            self._failure = "shutdown"
        for q in self._queues:
            q.put(_END)
        for s in self._streams:
            s.cancel()
        for c in self._channels:
            c.close()
