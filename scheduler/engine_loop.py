"""Runs an EngineCore in its own thread and hands outputs to asyncio consumers.

The scheduler state belongs to this thread alone: requests and aborts arrive through an
inbox queue and are applied between steps, so no lock guards the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from splitserve.protos import common_pb2, scheduler_pb2

from .engine_core import EngineCore
from .scheduler import RequestOutput, RequestRejected

logger = logging.getLogger(__name__)

_STOP = object()


class EngineLoop:
    def __init__(
        self,
        engine: EngineCore,
        loop: asyncio.AbstractEventLoop,
        on_dead: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.on_dead = on_dead
        self.dead: BaseException | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        self.engine.shutdown()

    # -- called on the event loop -------------------------------------------------------
    def add_request(
        self,
        req: scheduler_pb2.GenerateRequest,
        grammar: common_pb2.CompiledGrammar | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> asyncio.Queue:
        """Validate, register an output queue and hand the request (with its compiled
        constraint, if any) to the engine thread. `trace_context` (W3C headers) goes to the
        workers with the request's steps."""
        if self.dead is not None:
            raise RequestRejected("UNAVAILABLE", f"the engine is dead: {self.dead}")
        # validate() reads only fixed state, so it is safe off the engine thread.
        self.engine.scheduler.validate(list(req.prompt_token_ids), req.sampling_params)
        self.engine.scheduler.check_priority(req.priority)
        if req.request_id in self._streams:
            raise RequestRejected("ALREADY_EXISTS", f"request id {req.request_id!r} is in use")
        if len(self.engine.scheduler.waiting) >= self.engine.config.max_waiting_requests:
            raise RequestRejected("RESOURCE_EXHAUSTED", "the waiting queue is full; retry later")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[req.request_id] = q
        self._inbox.put(("add", (req, grammar, trace_context)))
        return q

    def abort(self, request_id: str) -> bool:
        """Abort a request this loop is streaming; False when it is not known."""
        if self._streams.pop(request_id, None) is None:
            return False
        self._inbox.put(("abort", request_id))
        return True

    # -- engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_work
                while True:
                    try:
                        item = self._inbox.get(block=block, timeout=None)
                    except queue.Empty:
                        break
                    if item is _STOP:
                        return
                    self._apply(item)
                    block = False
                outputs = self.engine.step()
                if outputs:
                    self.loop.call_soon_threadsafe(self._publish, outputs)
        except BaseException as exc:  # the engine is dead: fail every stream, then report
            logger.exception("engine loop died")
            self.dead = exc
            self.loop.call_soon_threadsafe(self._fail_all, exc)
            if self.on_dead is not None:
                self.on_dead(exc)

    def _apply(self, item: tuple) -> None:
        kind, arg = item
        if kind == "add":
            req, grammar, trace_context = arg
            try:
                request = self.engine.scheduler.add_request(req, grammar)
                request.trace_context = trace_context
            except RequestRejected as exc:
                out = RequestOutput(
                    req.request_id,
                    error=exc.message,
                    error_code=exc.code,
                    finish_reason=common_pb2.FinishReason.FINISH_REASON_ERROR,
                )
                self.loop.call_soon_threadsafe(self._publish, [out])
        else:
            self.engine.scheduler.abort_request(arg)

    # -- back on the event loop ---------------------------------------------------------
    def _publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is None:
                continue
            q.put_nowait(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, exc: BaseException) -> None:
        for rid, q in list(self._streams.items()):
            q.put_nowait(
                RequestOutput(
                    rid,
                    error=f"engine failed: {exc}",
                    error_code="UNAVAILABLE",
                    finish_reason=common_pb2.FinishReason.FINISH_REASON_ERROR,
                )
            )
        self._streams.clear()
