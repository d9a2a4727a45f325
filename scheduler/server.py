"""The scheduler's gRPC service: Generate streams, batched output streams (StreamOutputs +
Submit or SubmitStream), Abort, stats, model info, the LoRA adapter table (load, unload,
list); the standard health service and server reflection, so that a client calling Generate
directly (grpcurl, a stub of its own) can discover the API.

The scheduler talks to no tokenizer service: a structured-output constraint arrives compiled
(the gateway's Prepare call) or as a spec (a direct Generate caller), and either way goes to the
sampling rank with the request (see `request_constraint`)."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.common import tracing
from splitserve.common.engine_config import EngineConfigConflict
from splitserve.common.grpc_errors import ErrorInterceptor
from splitserve.common.messages_proto import extend_token_logprobs, generate_request_from_proto
from splitserve.protos import scheduler_pb2, scheduler_pb2_grpc

from .config import SchedulerConfig
from .engine_core import EngineCore
from .engine_loop import EngineLoop, OutputStream
from .lora_adapters import Adapter, AdapterError, AdapterTable
from .request_spans import RequestTimeline
from .scheduler import RequestOutput, RequestRejected, failed_output, request_constraint
from .stats_logger import start_stats_logging, stats_interval_s

logger = logging.getLogger(__name__)

SERVICE_NAME = "splitserve.scheduler.v1.SchedulerService"


def to_response(out: RequestOutput) -> scheduler_pb2.GenerateResponse:
    return fill_response(scheduler_pb2.GenerateResponse(), out)


def fill_response(
    r: scheduler_pb2.GenerateResponse, out: RequestOutput
) -> scheduler_pb2.GenerateResponse:
    """Write `out` into the empty message `r`; returns `r`."""
    r.token_ids.extend(out.token_ids)
    if out.logprobs:
        extend_token_logprobs(r.logprobs, out.logprobs)
    if out.prompt_logprobs:
        extend_token_logprobs(r.prompt_logprobs, out.prompt_logprobs)
    r.finish_reason = out.finish_reason
    r.num_prompt_tokens = out.num_prompt_tokens
    r.num_cached_tokens = out.num_cached_tokens
    if out.error:
        r.error = out.error
    if out.stop_token_id is not None:
        r.stop_token_id = out.stop_token_id
    if out.embedding is not None:
        r.embedding.extend(out.embedding)
    return r


def _output_batch(outputs: list[RequestOutput], timelines: dict) -> scheduler_pb2.OutputBatch:
    """One StreamOutputs message; finished requests' timelines are emitted and dropped."""
    batch = scheduler_pb2.OutputBatch()
    entries = batch.outputs
    for out in outputs:
        entry = entries.add(request_id=out.request_id, error_code=out.error_code)
        resp = fill_response(entry.output, out)
        timeline = timelines.get(out.request_id)
        if timeline is not None:
            first = not timeline.first_scheduled_ns
            timeline.observe(out)
            if first and timeline.first_scheduled_ns:
                resp.queue_time_s = timeline.queue_time_s()
            if out.finished:
                timeline.set_phase_times(resp)
                del timelines[out.request_id]
                if tracing.enabled():
                    timeline.emit()
    return batch


async def _heartbeats(stream: OutputStream, interval_s: float) -> None:
    """An empty delivery every `interval_s`: sent as an empty OutputBatch when the stream is
    quiet, merged into the next batch when it is busy (OutputStream.get joins queued ones)."""
    while True:
        await asyncio.sleep(interval_s)
        stream.deliver([])


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self) -> None:
        self.engine_loop: EngineLoop | None = None
        """Set once the workers are up; until then every call is UNAVAILABLE."""
        self.worker_traces = tracing.enabled()
        """Send each request's trace context to the workers: each rank adds its span to the
        request's trace (per-step spans too with --collect-detailed-traces, a worker flag)."""

    async def _engine(self, context) -> EngineLoop:
        if self.engine_loop is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the scheduler is starting")
        return self.engine_loop

    async def _queue(self, request, context, stream: OutputStream | None = None):
        """Queue the request (a GenerateRequest message: converted here, the scheduler's
        gRPC edge); refusals abort the call."""
        engine_loop = await self._engine(context)
        try:
            q, timeline = self._add(engine_loop, request, stream)
        except RequestRejected as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        return engine_loop, q, timeline

    def _add(self, engine_loop: EngineLoop, request, stream: OutputStream | None):
        """(the request's own queue or None, its timeline); raises RequestRejected."""
        request = generate_request_from_proto(request)
        # Arrival is noted before the request is queued: queue time starts here.
        timeline = RequestTimeline(request.request_id)
        if stream is not None:
            stream.timelines[request.request_id] = timeline
        try:
            q = engine_loop.add_request(
                request,
                request_constraint(request),
                tracing.inject_current() if self.worker_traces else None,
                stream,
            )
        except RequestRejected:
            if stream is not None:
                stream.timelines.pop(request.request_id, None)
            raise
        return q, timeline

    async def Generate(self, request, context):
        engine_loop, q, timeline = await self._queue(request, context)
        interval = request.heartbeat_interval_s if request.heartbeat_interval_s > 0 else None
        finished = False
        try:
            while True:
                try:
                    # NOTE: not wait_for, which in Python 3.11 can drop a cancellation.
                    async with asyncio.timeout(interval):
                        out: RequestOutput = await q.get()
                except TimeoutError:
                    yield scheduler_pb2.GenerateResponse()  # a heartbeat: quiet, not stalled
                    continue
                if out.error:
                    finished = True
                    await context.abort(
                        getattr(grpc.StatusCode, out.error_code or "INTERNAL"), out.error
                    )
                finished = out.finished
                first = not timeline.first_scheduled_ns
                timeline.observe(out)
                resp = to_response(out)
                if first and timeline.first_scheduled_ns:
                    resp.queue_time_s = timeline.queue_time_s()
                if finished:
                    timeline.set_phase_times(resp)
                yield resp
                if finished:
                    return
        finally:
            if not finished:  # the client cancelled or went away: abort downstream
                engine_loop.abort(request.request_id)
            if tracing.enabled():
                timeline.emit()

    async def StreamOutputs(self, request, context):
        engine_loop = await self._engine(context)
        try:
            stream = engine_loop.open_stream(request.stream_id)
        except RequestRejected as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        interval = request.heartbeat_interval_s
        heartbeats = asyncio.ensure_future(_heartbeats(stream, interval)) if interval > 0 else None
        try:
            yield scheduler_pb2.OutputBatch()  # registered: Submit may name it now
            while True:
                yield _output_batch(await stream.get(), stream.timelines)
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
            # The front end went away (or the server stops): nothing may keep running for it.
            orphans = engine_loop.close_stream(stream)
            if orphans:
                logger.info(
                    "output stream %s closed: aborted %d requests", stream.stream_id, len(orphans)
                )
            if tracing.enabled():
                for timeline in stream.timelines.values():
                    timeline.emit()
            stream.timelines.clear()

    async def Submit(self, request, context):
        engine_loop = await self._engine(context)
        stream = engine_loop.output_stream(request.stream_id)
        if stream is None:
            # UNAVAILABLE, not a client error: a front end submits right after it (re)opened
            # its stream, so a missing one is a stream that broke meanwhile (a 503, retryable).
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no open output stream {request.stream_id!r}: call StreamOutputs first",
            )
        await self._queue(request.request, context, stream)
        return scheduler_pb2.SubmitResponse()

    async def SubmitStream(self, request_iterator, context):
        engine_loop = await self._engine(context)
        async for submit in request_iterator:
            stream = engine_loop.output_stream(submit.stream_id)
            if stream is None:
                # NOTE: that stream broke; its front end fails what it submitted on it.
                logger.debug(
                    "request %s names output stream %s, which is not open: dropped",
                    submit.request.request_id,
                    submit.stream_id,
                )
                continue
            rid = submit.request.request_id
            try:
                self._add(engine_loop, submit.request, stream)
            except RequestRejected as exc:
                # The refusal Submit would answer with, as the request's one output.
                stream.deliver([failed_output(rid, exc.code, exc.message)])
            except Exception as exc:
                # NOTE: a bug fails this request (INTERNAL, as Submit's call would), not the
                # call that carries every other request of its front end.
                logger.exception("queueing request %s failed", rid)
                stream.deliver([failed_output(rid, "INTERNAL", f"{type(exc).__name__}: {exc}")])
        return scheduler_pb2.SubmitResponse()

    async def Abort(self, request, context):
        engine_loop = await self._engine(context)
        stream = engine_loop.stream_of(request.request_id)
        aborted = engine_loop.abort(request.request_id)
        if stream is not None:  # a Generate call cleans up itself; a streamed request here
            timeline = stream.timelines.pop(request.request_id, None)
            if timeline is not None and tracing.enabled():
                timeline.emit()
        return scheduler_pb2.AbortResponse(aborted=aborted)

    async def GetStats(self, request, context):
        return (await self._engine(context)).engine.stats()

    async def GetModelInfo(self, request, context):
        return (await self._engine(context)).engine.model_info

    # NOTE: the adapter table is the engine's (its scheduler's), so the in-process engine and
    # every front end of this scheduler share one set of names and load numbers.

    async def _adapters(self, context) -> AdapterTable:
        engine = (await self._engine(context)).engine
        if not engine.config.enable_lora:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "LoRA is not enabled: start the scheduler with --enable-lora",
            )
        return engine.scheduler.adapters

    async def LoadLoRAAdapter(self, request, context):
        table = await self._adapters(context)
        try:
            adapter = table.load(
                request.lora_name, request.lora_path, request.base_model_name, request.if_absent
            )
        except AdapterError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        logger.info("LoRA adapter %r loaded from %s (load %d)", *_named(adapter))
        return _adapter_proto(adapter)

    async def UnloadLoRAAdapter(self, request, context):
        table = await self._adapters(context)
        try:
            adapter = table.unload(request.lora_name)
        except AdapterError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        logger.info("LoRA adapter %r unloaded (was %s, load %d)", *_named(adapter))
        return _adapter_proto(adapter)

    async def ListLoRAAdapters(self, request, context):
        table = await self._adapters(context)
        return scheduler_pb2.ListLoRAAdaptersResponse(
            adapters=[_adapter_proto(a) for a in table.list()]
        )


def _named(adapter: Adapter) -> tuple[str, str, int]:
    return adapter.name, adapter.path, adapter.int_id


def _adapter_proto(adapter: Adapter) -> scheduler_pb2.LoRAAdapter:
    return scheduler_pb2.LoRAAdapter(
        lora_name=adapter.name,
        lora_path=adapter.path,
        lora_int_id=adapter.int_id,
        base_model_name=adapter.base_model_name,
    )


async def run_scheduler(
    config: SchedulerConfig, address: str, executor_factory=None, grace_s: float = 5.0
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (non-zero if the engine died)."""
    if not config.disable_log_stats:
        stats_interval_s()  # a bad VLLM_LOG_STATS_INTERVAL fails before anything starts
    loop = asyncio.get_running_loop()
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()], options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    servicer = SchedulerServicer()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    server.add_insecure_port(address)
    await server.start()
    logger.info(
        "scheduler listening on %s; connecting to workers %s", address, config.worker_addresses
    )

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    from .executor_grpc import GrpcExecutor, WorkerStartError

    if executor_factory is None:

        def executor_factory():
            return GrpcExecutor(
                config.worker_addresses, step_timeout_s=config.worker_step_timeout_s
            )

    engine_task = loop.run_in_executor(None, lambda: EngineCore(config, executor_factory()))
    done, _ = await asyncio.wait(
        {engine_task, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
    )
    if engine_task not in done:
        await server.stop(grace_s)
        return 0
    try:
        engine = engine_task.result()
    except (WorkerStartError, EngineConfigConflict) as exc:
        # One line, no traceback: the launcher shows it as the reason the stack did not start.
        logger.error("%s", exc)
        await server.stop(grace_s)
        return 1

    died = asyncio.Event()
    engine_loop = EngineLoop(engine, loop, on_dead=lambda exc: loop.call_soon_threadsafe(died.set))
    engine_loop.start()
    servicer.engine_loop = engine_loop
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("scheduler ready: %d KV blocks", engine.num_blocks)
    stats_task = start_stats_logging(config, engine.scheduler)

    try:
        await asyncio.wait(
            {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(died.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        if stats_task is not None:
            stats_task.cancel()
        await server.stop(grace_s)
        engine_loop.stop()
    return 1 if died.is_set() else 0
