"""Every running sequence of this gateway over one scheduler stream, detokenized here.

The gateway opens one `StreamOutputs` call to the scheduler and one `SubmitStream` call beside
it, and submits each sequence as a message on the latter: a unary call per request cost the two
processes about three times the CPU (with tracing on, each request still gets its own `Submit`
call, so that its trace goes on into the scheduler). Each step then arrives as one
`OutputBatch` holding the new tokens of all of them; a refused request ends as an error output.
One reader task fans a batch out: each sequence's `SequenceOutput` detokenizes its tokens with
the same `SequenceStream` the tokenizer service runs (built from the service's `DecoderSpec`,
fetched once), matches stop strings, and puts a `SequenceDelta` on its request's queue. So a
generated token costs no gRPC message of its own: no per-request stream, no detokenize call.

A sequence ends by its finish reason, a stop string, an error, its deadline or its consumer
going away; every end but a finish from the scheduler sends `Abort`, which frees its KV blocks.
If the stream itself breaks, every sequence on it fails, and the next request opens a new one.
So it does when the stream stays silent past --rpc-timeout-s: the scheduler sends an empty
batch every quarter of that while it has nothing else to send, so silence means it stalled.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable

import grpc

from splitserve.common import tracing
from splitserve.gateway.clients import SCHEDULER
from splitserve.gateway.errors import EngineError, RequestError, request_timeout, service_stalled
from splitserve.gateway.generation import note_timings
from splitserve.protos import common_pb2, scheduler_pb2, tokenizer_pb2
from splitserve.tokenizer_svc.decode_handle import DecodeHandle
from splitserve.tokenizer_svc.errors import RequestError as TokenizerRequestError
from splitserve.tokenizer_svc.output_processor import OutputProcessor
from splitserve.tokenizer_svc.stream import SequenceStream

logger = logging.getLogger(__name__)

_ERROR = int(common_pb2.FinishReason.FINISH_REASON_ERROR)
# Abort calls are fire-and-forget; keep their tasks referenced until they end.
_background: set[asyncio.Task] = set()

Put = Callable[[tuple], None]
"""A request's queue: (sequence index, delta or None, exception or None)."""


def grpc_error(code: grpc.StatusCode | str, details: str) -> grpc.aio.AioRpcError:
    """The error a per-request gRPC call would have raised, for the same HTTP mapping."""
    if isinstance(code, str):
        code = getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class SequenceOutput:
    """One sequence on the router: the shared `OutputProcessor` plus where its deltas go."""

    __slots__ = ("index", "spec", "put", "proc", "done", "timer", "trace")

    def __init__(self, index: int, spec, put: Put, decoder: DecoderInfo, eos: frozenset[int]):
        self.index = index
        self.spec = spec
        self.put = put
        try:
            stream = SequenceStream(
                decoder.handle,
                spec.prompt_token_ids,
                spec.skip_special_tokens,
                spec.stop,
                spec.include_stop_str_in_output,
                decoder.max_stop_strings,
            )
        except TokenizerRequestError as exc:  # what the tokenizer service would have refused
            raise grpc_error(exc.status, exc.message) from None
        self.proc = OutputProcessor(
            stream,
            len(spec.prompt_token_ids),
            has_stop_strings=bool(spec.stop),
            include_stop_str_in_output=spec.include_stop_str_in_output,
            stop_token_ids=spec.stop_token_ids,
            eos=eos,
            want_logprobs=spec.want_logprobs,
            want_prompt_logprobs=spec.want_prompt_logprobs,
        )
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.trace = (
            tracing.DetokenizeTrace(__name__, spec.request_id) if tracing.enabled() else None
        )

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def wants_strings(self) -> bool:
        return self.spec.want_logprobs or self.proc.prompt_lps is not None

    def wanted_strings(self, resp: scheduler_pb2.GenerateResponse) -> Iterable[int]:
        """Token ids whose strings this output's logprobs will render."""
        spec = self.spec
        if spec.want_logprobs:
            yield from _ids_in(resp.logprobs)
        if self.proc.prompt_lps is not None and resp.prompt_logprobs:
            yield from spec.prompt_token_ids
            yield from _ids_in(resp.prompt_logprobs)

    def fail(self, exc: BaseException) -> None:
        self.done = True
        self.put((self.index, None, exc))

    def on_output(self, entry: scheduler_pb2.StreamedOutput) -> bool:
        """Process one output; True when the sequence ended here."""
        resp = entry.output
        if entry.error_code:
            self.fail(grpc_error(entry.error_code, resp.error))
            return True
        spec = self.spec
        note_timings(spec, resp)
        token_ids = resp.token_ids
        if self.trace is not None:
            self.trace.num_tokens += len(token_ids)
        finish = resp.finish_reason
        if finish == _ERROR:
            self.fail(EngineError(resp.error or "unknown engine error"))
            return True
        proc = self.proc
        try:
            # NOTE: each protobuf field read costs; those the processor ignores are not read.
            delta = proc.process(
                token_ids,
                resp.logprobs if spec.want_logprobs else (),
                resp.prompt_logprobs if proc.prompt_lps is not None else (),
                finish,
                resp.stop_token_id if finish and resp.HasField("stop_token_id") else None,
                resp.num_prompt_tokens,
                resp.num_cached_tokens,
            )
        except TokenizerRequestError as exc:
            raise grpc_error(exc.status, exc.message) from None
        if delta is not None:
            self.done = proc.done
            self.put((self.index, delta, None))
        return proc.done


def _ids_in(entries) -> Iterable[int]:
    for e in entries:
        yield e.token_id
        yield from e.top_token_ids


class DecoderInfo:
    """The tokenizer service's DecoderSpec, rebuilt for local use."""

    __slots__ = ("handle", "max_stop_strings")

    def __init__(self, spec: tokenizer_pb2.DecoderSpec) -> None:
        self.handle = DecodeHandle(spec.tokenizer_json, spec.skip_special_ids, spec.vocab_size)
        self.max_stop_strings = spec.max_stop_strings


class OutputRouter:
    """This gateway's output stream from the scheduler and the sequences reading it."""

    def __init__(self, clients, decoder: DecoderInfo) -> None:
        self._clients = clients
        self._decoder = decoder
        self._seqs: dict[str, SequenceOutput] = {}
        self._wanting_strings: set[SequenceOutput] = set()
        """The registered sequences that want logprobs or prompt logprobs (token strings)."""
        self._call = None
        self._stream_id = ""
        self._submissions: asyncio.Queue | None = None
        """SubmitRequests for the open stream's SubmitStream call; None while none is open."""
        self._submit_call = None
        self._submit_watch: asyncio.Task | None = None
        self._opening: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._waiting_since: float | None = None
        """When the reader began waiting for the next batch (None while it handles one)."""
        self._broken: tuple[asyncio.Task, BaseException] | None = None
        """A reader cancelled because its stream broke (it stalled, or its submissions ended),
        and the error its requests fail with: its end is then that, not a shutdown."""
        self.stalled = False
        """The last stream went silent past --rpc-timeout-s; cleared when a new one opens."""
        self.batches_read = 0
        """OutputBatch messages read so far (tests count messages per step with it)."""

    # ------------------------------------------------------------------ the stream

    async def _ensure_open(self) -> str:
        if self._call is not None:
            return self._stream_id
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._opening)
        finally:
            if self._opening is not None and self._opening.done():
                self._opening = None

    async def _open(self) -> str:
        stream_id = f"gw-{uuid.uuid4().hex}"
        timeout = self._clients.rpc_timeout_s
        call = self._clients.scheduler.StreamOutputs(
            scheduler_pb2.StreamOutputsRequest(
                stream_id=stream_id, heartbeat_interval_s=self._clients.heartbeat_interval_s
            )
        )
        try:
            first = await asyncio.wait_for(call.read(), timeout)
        except TimeoutError:
            call.cancel()
            self.stalled = True
            raise service_stalled(SCHEDULER, timeout) from None
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            raise EngineError("the scheduler closed the output stream at once")
        submissions: asyncio.Queue = asyncio.Queue()
        submit_call = self._clients.scheduler.SubmitStream(_queued(submissions))
        self._call, self._stream_id = call, stream_id
        self._submissions, self._submit_call = submissions, submit_call
        self._submit_watch = asyncio.ensure_future(self._watch_submissions(submit_call))
        self.stalled = False
        self._waiting_since = None
        self._reader = asyncio.ensure_future(self._read(call))
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())
        logger.info("output stream %s open", stream_id)
        return stream_id

    async def _watch(self) -> None:
        """Fail the stream when it has been silent past --rpc-timeout-s (heartbeats included):
        the scheduler is stopped or hung, and its requests must not wait on it forever. After
        a stall, keep trying to open a new stream, so that /health recovers with the scheduler
        even when no request comes (a probe that sees 503 sends none)."""
        loop = asyncio.get_running_loop()
        while True:
            timeout = self._clients.rpc_timeout_s
            await asyncio.sleep(self._clients.heartbeat_interval_s)
            if self.stalled and self._call is None:
                try:
                    await self._ensure_open()
                except (grpc.aio.AioRpcError, RequestError, EngineError) as exc:
                    logger.info("the scheduler's output stream does not open yet: %s", exc)
                continue
            since = self._waiting_since
            reader = self._reader
            if since is None or reader is None or reader.done():
                continue
            if loop.time() - since > timeout:
                logger.error(
                    "the scheduler's output stream %s was silent for %.0fs (--rpc-timeout-s): "
                    "failing its %d requests",
                    self._stream_id,
                    loop.time() - since,
                    len(self._seqs),
                )
                self.stalled = True
                self._broken = (reader, service_stalled(SCHEDULER, timeout))
                reader.cancel()

    async def _watch_submissions(self, submit_call) -> None:
        """Wait for the SubmitStream call to end. Unless the stream it served closed first (or
        the gateway stops), the scheduler stopped taking requests: fail the stream, whose
        requests would otherwise wait for outputs that never come."""
        try:
            await submit_call
            error = grpc_error(
                grpc.StatusCode.UNAVAILABLE, "the scheduler ended the request submissions"
            )
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            return
        if submit_call is not self._submit_call:
            return  # its stream closed first, and its reader failed what ran on it
        logger.error("the scheduler's submission call ended: %s", error.details())
        reader = self._reader
        if reader is not None and not reader.done():
            self._broken = (reader, error)
            reader.cancel()

    async def _read(self, call) -> None:
        error: BaseException | None = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._waiting_since = loop.time()
                batch = await call.read()
                self._waiting_since = None
                if batch is grpc.aio.EOF:
                    break
                self.batches_read += 1
                await self._dispatch(batch.outputs)
        except asyncio.CancelledError:
            broken = self._broken
            if broken is not None and broken[0] is asyncio.current_task():
                # NOTE: the watchdog's cancel (or the submissions broke); the call is dropped
                # below (the scheduler, if it ever resumes, aborts every request on it), and
                # the next request opens anew.
                call.cancel()
                error = broken[1]
            else:
                error = EngineError("the gateway is shutting down")
                raise
        except grpc.aio.AioRpcError as exc:
            error = exc
        except Exception as exc:  # a bug here must not leave requests hanging
            logger.exception("output stream reader failed")
            error = exc
        finally:
            self._waiting_since = None
            if self._call is call:
                self._call = None
                self._end_submissions()
            failure = error or grpc_error(
                grpc.StatusCode.UNAVAILABLE, "the scheduler ended the output stream"
            )
            for seq in list(self._seqs.values()):
                self._forget(seq)
                seq.fail(failure)

    async def _dispatch(self, entries) -> None:
        seqs = self._seqs
        wanted: list[int] = []
        if self._wanting_strings:  # NOTE: else no entry can want any (one pass, not two)
            for e in entries:
                seq = seqs.get(e.request_id)
                if seq is not None and seq.wants_strings:
                    wanted.extend(seq.wanted_strings(e.output))
        if wanted:
            missing = self._clients.missing_token_strings(wanted)
            if missing:
                try:
                    await self._clients.fetch_token_strings(missing)
                except (grpc.aio.AioRpcError, RequestError) as exc:
                    self._fail_wanting_strings(entries, exc)
        for e in entries:
            seq = seqs.get(e.request_id)
            if seq is None:
                continue  # ended here already (stop string, consumer gone): aborted
            try:
                ended = seq.on_output(e)
                cut_short = ended and seq.proc.stopped_by_string
            except grpc.aio.AioRpcError as exc:
                seq.fail(exc)
                ended = cut_short = True
            if ended:
                self._forget(seq)
                if cut_short and not e.output.finish_reason:
                    self._abort(seq.request_id)  # the scheduler still runs it

    def _fail_wanting_strings(self, entries, exc: BaseException) -> None:
        for e in entries:
            seq = self._seqs.get(e.request_id)
            if seq is not None and seq.spec.want_logprobs:
                self._forget(seq)
                seq.fail(exc)
                self._abort(seq.request_id)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        if self._call is not None:
            self._call.cancel()
        self._end_submissions()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    def _end_submissions(self) -> None:
        submit_call, self._submit_call, self._submissions = self._submit_call, None, None
        if submit_call is not None:
            submit_call.cancel()

    def _submit(self, stream_id: str, seq: SequenceOutput) -> None:
        """Queue a registered sequence on `stream_id`'s submissions; fail it when that stream
        broke since it opened (its reader failed only the sequences registered before)."""
        # NOTE: `_submissions` is None once the stream's call ended or closed.
        if self._submissions is None or self._stream_id != stream_id:
            self._forget(seq)
            seq.fail(grpc_error(grpc.StatusCode.UNAVAILABLE, "the scheduler's stream broke"))
            return
        request = seq.spec.to_request()
        self._submissions.put_nowait(
            scheduler_pb2.SubmitRequest(stream_id=stream_id, request=request)
        )

    # ------------------------------------------------------------------ sequences

    def start(self, specs: list, deadline, put: Put) -> RouterGroup:
        """Run `specs` (one request's sequences), their deltas going to `put`."""
        eos = self._clients.eos_token_ids
        seqs = [SequenceOutput(i, s, put, self._decoder, eos) for i, s in enumerate(specs)]
        return RouterGroup(self, seqs, deadline)

    def _register(self, seq: SequenceOutput, deadline) -> None:
        self._seqs[seq.request_id] = seq
        if seq.wants_strings:
            self._wanting_strings.add(seq)
        remaining = deadline.remaining()
        if remaining is not None:
            seq.timer = asyncio.get_running_loop().call_later(remaining, self._expire, seq)

    def _expire(self, seq: SequenceOutput) -> None:
        if self._seqs.get(seq.request_id) is seq:
            self._forget(seq)
            seq.fail(request_timeout())
            self._abort(seq.request_id)

    def _forget(self, seq: SequenceOutput) -> None:
        if self._seqs.get(seq.request_id) is seq:
            del self._seqs[seq.request_id]
        self._wanting_strings.discard(seq)
        if seq.timer is not None:
            seq.timer.cancel()
            seq.timer = None
        if seq.trace is not None:
            seq.trace.emit()
            seq.trace = None

    def _abort(self, request_id: str) -> None:
        stub = self._clients.scheduler
        if stub is None:
            return

        async def abort() -> None:
            try:
                await stub.Abort(
                    scheduler_pb2.AbortRequest(request_id=request_id),
                    timeout=self._clients.rpc_timeout_s,
                )
            except grpc.aio.AioRpcError as exc:  # the scheduler is gone: nothing runs there
                logger.debug("abort of %s failed: %s", request_id, exc.code())

        task = asyncio.ensure_future(abort())
        _background.add(task)
        task.add_done_callback(_background.discard)

    def cancel(self, seq: SequenceOutput) -> None:
        """The consumer went away: stop the sequence and free what it holds."""
        if self._seqs.get(seq.request_id) is seq:
            self._forget(seq)
            self._abort(seq.request_id)


class RouterGroup:
    """The sequences of one request on the router: submitted together, closed together."""

    def __init__(self, router: OutputRouter, seqs: list[SequenceOutput], deadline) -> None:
        self._router = router
        self._seqs = seqs
        self._submitting = asyncio.ensure_future(self._submit_all(deadline))

    async def _submit_all(self, deadline) -> None:
        router = self._router
        try:
            stream_id = await router._ensure_open()
        except Exception as exc:
            for seq in self._seqs:
                seq.fail(exc)
            return
        for seq in self._seqs:
            router._register(seq, deadline)
        if tracing.enabled():
            # NOTE: a call per request, so that the scheduler's spans of each request hang
            # under its own Submit call in the request's trace (a SubmitStream call is one
            # span for all). Tracing is opt-in; its cost is that call.
            await asyncio.gather(*(self._submit(stream_id, seq, deadline) for seq in self._seqs))
            return
        for seq in self._seqs:
            router._submit(stream_id, seq)

    async def _submit(self, stream_id: str, seq: SequenceOutput, deadline) -> None:
        request = seq.spec.to_request()
        clients = self._router._clients
        try:
            await clients.scheduler.Submit(
                scheduler_pb2.SubmitRequest(stream_id=stream_id, request=request),
                timeout=clients.call_timeout(deadline),
            )
        except grpc.aio.AioRpcError as exc:
            if self._router._seqs.get(seq.request_id) is seq:
                self._router._forget(seq)
                stalled = clients.stalled_error(exc, deadline, SCHEDULER)
                if stalled is not exc:
                    self._router._abort(seq.request_id)  # it may be queued there
                    seq.fail(stalled)
                elif exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or deadline.expired():
                    # NOTE: past our own deadline, any call failure is that deadline (the
                    # request may be queued: abort it).
                    self._router._abort(seq.request_id)
                    seq.fail(request_timeout())
                else:
                    seq.fail(exc)

    async def aclose(self) -> None:
        """Stop every sequence still running (aborting it in the scheduler)."""
        if not self._submitting.done():
            self._submitting.cancel()
            await asyncio.gather(self._submitting, return_exceptions=True)
        for seq in self._seqs:
            if not seq.done:
                self._router.cancel(seq)


async def _queued(submissions: asyncio.Queue):
    """A SubmitStream call's messages: what `submissions` gets, for as long as it is open."""
    while True:
        yield await submissions.get()
