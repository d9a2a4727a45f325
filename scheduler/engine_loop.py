"""Runs an EngineCore in its own thread and hands outputs to asyncio consumers.

The scheduler state belongs to this thread alone: requests and aborts arrive through an
inbox queue and are applied between steps, so no lock guards the scheduler.

A request's outputs go to one sink: its own queue (a Generate call) or a front end's
`OutputStream` (StreamOutputs), which gets each step's outputs of all its requests as one list.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from splitserve.common import messages as msg
from splitserve.protos import common_pb2

from .engine_core import EngineCore
from .scheduler import RequestOutput, RequestRejected, failed_output

logger = logging.getLogger(__name__)

_STOP = object()


class _RequestQueue:
    """The sink of one Generate call: its outputs one by one."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self.queue.put_nowait(out)


class OutputStream:
    """The sink of one StreamOutputs call: each step's outputs of its requests as one list."""

    __slots__ = ("stream_id", "_queue", "timelines")

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self.timelines: dict = {}
        """request id -> its RequestTimeline (kept by the server for queue time and spans)."""

    def deliver(self, outputs: list[RequestOutput]) -> None:
        self._queue.put_nowait(outputs)

    async def get(self) -> list[RequestOutput]:
        """The next step's outputs, with those of any later steps already queued (a slow
        reader gets fewer, larger messages)."""
        outputs = await self._queue.get()
        while not self._queue.empty():
            outputs = outputs + self._queue.get_nowait()
        return outputs


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
        self._streams: dict[str, _RequestQueue | OutputStream] = {}
        """request id -> where its outputs go."""
        self._output_streams: dict[str, OutputStream] = {}
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
        req: msg.GenerateRequest,
        grammar: msg.CompiledGrammar | msg.GrammarSpec | None = None,
        trace_context: dict[str, str] | None = None,
        stream: OutputStream | None = None,
    ) -> asyncio.Queue | None:
        """Validate, register the request's sink and hand it (with its constraint, if any) to
        the engine thread. `trace_context` (W3C headers) goes to the workers with
        the request's steps. Returns the request's own output queue, or None when its
        outputs go to `stream`."""
        if self.dead is not None:
            raise RequestRejected("UNAVAILABLE", f"the engine is dead: {self.dead}")
        # validate() reads only fixed state, so it is safe off the engine thread.
        self.engine.scheduler.validate(req.prompt_token_ids, req.sampling_params, req.lora_name)
        self.engine.scheduler.check_priority(req.priority)
        # NOTE: the adapter table is thread-safe; an unload racing this check fails the request
        # on the engine thread instead (an error output, same status).
        self.engine.scheduler.resolve_lora(req)
        if req.request_id in self._streams:
            raise RequestRejected("ALREADY_EXISTS", f"request id {req.request_id!r} is in use")
        if len(self.engine.scheduler.waiting) >= self.engine.config.max_waiting_requests:
            raise RequestRejected("RESOURCE_EXHAUSTED", "the waiting queue is full; retry later")
        sink = stream if stream is not None else _RequestQueue()
        self._streams[req.request_id] = sink
        self._inbox.put(("add", (req, grammar, trace_context)))
        return None if stream is not None else sink.queue

    def abort(self, request_id: str) -> bool:
        """Abort a request this loop is streaming; False when it is not known. A Generate
        call still reading (aborted through the Abort RPC) gets a last output, finish reason
        ABORT, so that its stream ends instead of waiting for outputs that never come."""
        sink = self._streams.pop(request_id, None)
        if sink is None:
            return False
        self._inbox.put(("abort", request_id))
        if isinstance(sink, _RequestQueue):
            sink.deliver(
                [
                    RequestOutput(
                        request_id, finish_reason=common_pb2.FinishReason.FINISH_REASON_ABORT
                    )
                ]
            )
        return True

    def open_stream(self, stream_id: str) -> OutputStream:
        """Register a front end's output stream; its id must not be open already."""
        if self.dead is not None:
            raise RequestRejected("UNAVAILABLE", f"the engine is dead: {self.dead}")
        if stream_id in self._output_streams:
            raise RequestRejected("ALREADY_EXISTS", f"output stream {stream_id!r} is open")
        stream = OutputStream(stream_id)
        self._output_streams[stream_id] = stream
        return stream

    def stream_of(self, request_id: str) -> OutputStream | None:
        """The output stream a running request was submitted to; None for a Generate call."""
        sink = self._streams.get(request_id)
        return sink if isinstance(sink, OutputStream) else None

    def output_stream(self, stream_id: str) -> OutputStream | None:
        return self._output_streams.get(stream_id)

    def close_stream(self, stream: OutputStream) -> list[str]:
        """Unregister a stream and abort the requests still running on it; their ids."""
        if self._output_streams.get(stream.stream_id) is stream:
            del self._output_streams[stream.stream_id]
        orphans = [rid for rid, sink in self._streams.items() if sink is stream]
        for rid in orphans:
            self.abort(rid)
        return orphans

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
                out = failed_output(req.request_id, exc.code, exc.message)
                self.loop.call_soon_threadsafe(self._publish, [out])
        else:
            self.engine.scheduler.abort_request(arg)

    # -- back on the event loop ---------------------------------------------------------
    def _publish(self, outputs: list[RequestOutput]) -> None:
        # NOTE: one deliver() per sink per step: a front end's stream gets one list.
        by_sink: dict[int, tuple[_RequestQueue | OutputStream, list[RequestOutput]]] = {}
        streams = self._streams
        for out in outputs:
            sink = streams.get(out.request_id)
            if sink is None:
                continue
            entry = by_sink.get(id(sink))
            if entry is None:
                by_sink[id(sink)] = (sink, [out])
            else:
                entry[1].append(out)
            if out.finished:
                del streams[out.request_id]
        for sink, outs in by_sink.values():
            sink.deliver(outs)

    def _fail_all(self, exc: BaseException) -> None:
        self._publish(
            [failed_output(rid, "UNAVAILABLE", f"engine failed: {exc}") for rid in self._streams]
        )
        self._streams.clear()
