"""Runs the worker's ModelRunner in this process, on its own thread.

Steps and results pass as they are (`splitserve.common.messages` dataclasses): no protobuf
message is built per step here (tests/offline/test_no_protobuf_steps.py checks).

The engine loop plans step N+1 while this thread computes step N (torch releases the GIL
inside its kernels), the same overlap the gRPC executor gets across processes.
"""

from __future__ import annotations

import queue
import threading

from splitserve.common import messages as msg
from splitserve.protos import common_pb2, worker_pb2

_END = object()


class InprocExecutor:
    def __init__(self, runner) -> None:
        self.runner = runner
        self._steps: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def describe(
        self, block_size: int, engine: common_pb2.EngineConfig
    ) -> list[worker_pb2.DescribeResponse]:
        return [self.runner.describe(block_size, engine)]

    def initialize_cache(self, num_blocks: int, block_size: int, num_state_slots: int = 0) -> None:
        self.runner.initialize_cache(num_blocks, block_size, num_state_slots)
        self._thread = threading.Thread(target=self._run, name="inproc-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (step := self._steps.get()) is not _END:
            try:
                self._results.put(self.runner.execute(step))
            except BaseException as exc:  # handed to the engine loop, which fails loudly
                self._results.put(exc)

    def submit(self, step: msg.StepRequest) -> None:
        self._steps.put(step)

    def get_result(self) -> msg.StepResult:
        r = self._results.get()
        if isinstance(r, BaseException):
            raise r
        return r

    def shutdown(self) -> None:
        if self._thread is not None:
            self._steps.put(_END)
            self._thread.join(timeout=30)
            self._thread = None
