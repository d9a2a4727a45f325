"""The worker's gRPC service: Describe, InitializeCache and the Execute step stream.

Health (grpc.health.v1) says NOT_SERVING until the weights are loaded and InitializeCache has
allocated the cache and warmed up, then SERVING; it turns NOT_SERVING again if a step fails
unexpectedly (the engine is dead). All runner calls go through one thread, in order, so the
event loop stays free to read the next StepRequest while a step computes.

Execute is the worker's gRPC edge for steps: the event loop converts each StepRequest message
into the `splitserve.common.messages` dataclass the runner works on, and each result back (while
the step thread computes); the runner itself never sees protobuf.

With pipeline parallelism (P > 1) the rank joins the torch.distributed group once its weights
are loaded (see stage_transfer.py); each step then receives the previous rank's activations
and sends its own to the next on that same thread. A transfer failure (a peer died or timed
out) kills this rank's engine like any step failure.

With tensor parallelism (T > 1) only a stage's driver (--tp-rank 0) serves WorkerService; it
hands every Describe, InitializeCache and step to its peers over torch.distributed before
running it (`tp_channel.py`), and heartbeats while idle. A peer serves gRPC health only, runs
its driver's commands, and exits non-zero when the driver is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.common import tracing
from splitserve.common.engine_config import EngineConfigConflict
from splitserve.common.grpc_errors import ErrorInterceptor
from splitserve.common.messages_proto import step_request_from_proto, step_result_to_proto
from splitserve.protos import worker_pb2, worker_pb2_grpc
from splitserve.worker.config import WorkerConfig
from splitserve.worker.trace_spans import WorkerSpans

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
MAX_MESSAGE_BYTES = 512 << 20
"""Steps with many long prompts, and prompt logprobs, exceed gRPC's 4 MiB default."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Serves one ModelRunner; every runner call runs on the single `executor` thread."""

    def __init__(
        self, health_servicer: health.aio.HealthServicer, spans: WorkerSpans | None = None
    ) -> None:
        self.health = health_servicer
        self.spans = spans
        """This rank's spans in request traces (an OTLP endpoint set); None: off."""
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-step")
        self.runner_ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stage = None
        """The PipelineStage around the runner, set with runner_ready."""
        self.dead: BaseException | None = None

    async def set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _runner(self, context):
        """The runner once loaded (waits for it); aborts when loading failed or a step died."""
        try:
            runner = await asyncio.shield(self.runner_ready)
        except Exception as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the model failed to load: {type(exc).__name__}: {exc}",
            )
        if self.dead is not None:
            await context.abort(grpc.StatusCode.INTERNAL, f"the worker is dead: {self.dead}")
        return runner

    async def Describe(self, request, context):
        await self._runner(context)
        engine = request.engine if request.HasField("engine") else None
        try:
            return await self._call(self.stage.describe, request.block_size, engine)
        except EngineConfigConflict as exc:
            # The scheduler's engine fields contradict this rank's flags: it may not start.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def InitializeCache(self, request, context):
        await self._runner(context)
        if request.num_blocks < 1 or request.block_size < 1:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"num_blocks and block_size must be positive, got "
                f"{request.num_blocks} and {request.block_size}",
            )
        await self.set_health(_NOT_SERVING)
        seconds = await self._call(
            self.stage.initialize_cache,
            request.num_blocks,
            request.block_size,
            request.num_state_slots,
        )
        await self.set_health(_SERVING)
        return worker_pb2.InitializeCacheResponse(seconds=seconds)

    async def Execute(self, request_iterator, context):
        runner = await self._runner(context)
        if runner.batch is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "InitializeCache must run before Execute"
            )
        queue: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            # Keeps reading while a step computes, so the scheduler's next step is queued.
            try:
                async for step in request_iterator:
                    # The message itself rides along: a tensor-parallel driver forwards it.
                    await queue.put((step_request_from_proto(step), step))
            finally:
                await queue.put(None)

        reader = asyncio.create_task(read())
        interval = self.stage.watch_interval
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), interval)
                except TimeoutError:
                    # Idle: a pipeline rank checks that the next one still takes its sends.
                    await self._run_step(self.stage.check, None)
                    continue
                if item is None:
                    break
                step, message = item
                execute = functools.partial(self.stage.execute, message=message)
                spans = self.spans
                if spans is None:
                    yield step_result_to_proto(await self._run_step(execute, step))
                    continue
                spans.before(step)
                start_ns = time.time_ns()
                result = await self._run_step(execute, step)
                spans.after(step, start_ns, time.time_ns())
                yield step_result_to_proto(result)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _run_step(self, fn, step):
        try:
            return await self._call(fn, step) if step is not None else await self._call(fn)
        except Exception as exc:
            where = f"step {step.step_id}" if step is not None else "the stage check"
            logger.error("%s failed; this worker is dead: %s", where, exc)
            self.dead = exc
            await self.set_health(_NOT_SERVING)
            raise

    async def heartbeats(self) -> None:
        """A tensor-parallel driver: while nothing else goes to its peers, tell them it is
        alive (on the step thread, between commands); a failure kills the engine."""
        channel = self.stage.channel
        while self.dead is None:
            await asyncio.sleep(channel.interval / 2)
            if channel.heartbeat_due():
                with contextlib.suppress(Exception):  # _run_step logged it and marked us dead
                    await self._run_step(self.stage.heartbeat, None)

    async def GetStageStats(self, request, context):
        await self._runner(context)
        return self.stage.stats(reset=request.reset)


async def run_worker(
    config: WorkerConfig, address: str, ready_event=None, grace: float = 5.0
) -> None:
    """Serve a worker on `address` (host:port or unix:path) until SIGTERM/SIGINT or cancelled.

    The server listens (and `ready_event`, a threading.Event or asyncio.Event, is set) before
    the weights load; health turns SERVING after InitializeCache. Raises when loading fails.
    """
    from splitserve.worker.model_runner import ModelRunner
    from splitserve.worker.stage_transfer import PipelineStage, StageLink

    if config.world_size > 1:
        config.init_method()  # fail before listening when the ranks cannot meet
    loop = asyncio.get_running_loop()
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    spans = None
    if tracing.enabled():
        spans = WorkerSpans(config.rank, per_step=config.collect_detailed_traces is not None)
    servicer = WorkerServicer(health_servicer, spans)
    await servicer.set_health(_NOT_SERVING)
    if config.tp_rank > 0:
        # A tensor-parallel peer serves health only: the scheduler talks to its driver.
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if not server.add_insecure_port(address) and not address.startswith("unix:"):
            raise OSError(f"could not bind {address}")
        await server.start()
        try:
            await _serve_peer(config, servicer, ready_event)
        finally:
            await servicer.set_health(_NOT_SERVING)
            await server.stop(grace)
        return
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if not server.add_insecure_port(address) and not address.startswith("unix:"):
        raise OSError(f"could not bind {address}")
    await server.start()
    logger.info("worker rank %d listening on %s", config.rank, address)
    stop = asyncio.Event()
    signals = _install_signal_handlers(loop, stop)
    if ready_event is not None:
        ready_event.set()
    link = None
    try:
        try:
            runner = await loop.run_in_executor(servicer.executor, ModelRunner, config)
            if config.world_size > 1:
                link = await loop.run_in_executor(
                    servicer.executor, StageLink, config, runner.device
                )
        except Exception as exc:
            servicer.runner_ready.set_exception(exc)
            raise
        channel = None
        if config.tensor_parallel_size > 1:
            from splitserve.worker.tp_channel import StageChannel

            channel = StageChannel(runner.device, config.distributed_timeout_seconds)
        servicer.stage = PipelineStage(runner, link, channel)
        servicer.runner_ready.set_result(runner)
        if channel is not None:
            heartbeats = asyncio.create_task(servicer.heartbeats())
        logger.info("weights loaded; waiting for InitializeCache")
        await stop.wait()
        logger.info("stopping (grace %.1fs)", grace)
        if channel is not None:
            heartbeats.cancel()
            if servicer.dead is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        loop.run_in_executor(servicer.executor, servicer.stage.stop_peers), 10
                    )
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await servicer.set_health(_NOT_SERVING)
        await server.stop(grace)
        if link is not None:
            # On the step thread, after any step in progress (a peer that stops closes its
            # connection, which ends a pending receive at once).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(loop.run_in_executor(servicer.executor, link.close), 10)
        servicer.executor.shutdown(wait=False, cancel_futures=True)
        if servicer.runner_ready.done() and not servicer.runner_ready.cancelled():
            servicer.runner_ready.exception()  # mark retrieved: raised above already


async def _serve_peer(config: WorkerConfig, servicer: WorkerServicer, ready_event) -> None:
    """A tensor-parallel peer: load, join the stage, then run the driver's commands until it
    says stop (or SIGTERM); raises when the driver is gone, so the process exits non-zero."""
    from splitserve.worker.model_runner import ModelRunner
    from splitserve.worker.stage_transfer import PipelineStage, StageLink
    from splitserve.worker.tp_channel import StageChannel, serve_peer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = _install_signal_handlers(loop, stop)
    if ready_event is not None:
        ready_event.set()
    logger.info("tensor-parallel rank %d of stage %d", config.tp_rank, config.rank)
    link = None
    try:
        runner = await loop.run_in_executor(servicer.executor, ModelRunner, config)
        link = await loop.run_in_executor(servicer.executor, StageLink, config, runner.device)
        channel = StageChannel(runner.device, config.distributed_timeout_seconds)
        stage = PipelineStage(runner, link)
        await servicer.set_health(_SERVING)
        stopping = threading.Event()
        serving = loop.run_in_executor(
            servicer.executor, serve_peer, runner, stage, channel, stopping
        )
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopping.set()
        if serving in done:
            serving.result()  # raises when the driver is gone
        stopped.cancel()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        # NOTE: the step thread may be blocked in a collective: do not wait for it.
        servicer.executor.shutdown(wait=False, cancel_futures=True)


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> list:
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (in-process use): cancel the task to stop instead
    return installed
