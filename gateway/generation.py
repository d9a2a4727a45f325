"""Running generated sequences.

Where the tokenizer service ships its decoder, a request's sequences run on the gateway's one
batched output stream (`output_stream.OutputRouter`). Otherwise (a Python or mistral_common
tokenizer) each sequence runs `run_sequence` here: one scheduler Generate call + one
DetokenizeStream. Per step a sequence then costs one scheduler message and one detokenize round
trip; logprob token strings come from the DecodeEach cache, fetched (only on a miss)
concurrently with that round trip. Stop strings are matched by the tokenizer service; when one matches, the Generate call is
cancelled, which aborts the request in the scheduler and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc

from splitserve.gateway.clients import SCHEDULER, TOKENIZER_SERVICE, ServiceClients
from splitserve.gateway.errors import EngineError, request_timeout
from splitserve.protos import common_pb2, scheduler_pb2, tokenizer_pb2
from splitserve.tokenizer_svc.output_processor import SequenceDelta  # noqa: F401 (re-exported)

_FINISH = common_pb2.FinishReason
_FINISH_NAMES = {
    _FINISH.FINISH_REASON_STOP: "stop",
    _FINISH.FINISH_REASON_LENGTH: "length",
    _FINISH.FINISH_REASON_ABORT: "abort",
}
# Streams finished normally are closed off the hot path; keep their tasks referenced.
_closing: set[asyncio.Task] = set()


class Deadline:
    """One request's deadline, shared by all of its gRPC calls."""

    __slots__ = ("_at",)

    def __init__(self, timeout_s: float | None) -> None:
        self._at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        """Seconds left for the next call (None: no deadline)."""
        if self._at is None:
            return None
        return max(0.001, self._at - time.monotonic())

    def expired(self) -> bool:
        """Whether the deadline has passed (a DEADLINE_EXCEEDED then is the gateway's own)."""
        return self._at is not None and time.monotonic() >= self._at


@dataclass(slots=True)
class SequenceSpec:
    """What one generated sequence needs."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    want_logprobs: bool = False
    want_prompt_logprobs: bool = False
    priority: int = 0
    grammar: common_pb2.CompiledGrammar | None = None
    """The request's structured-output constraint as Prepare compiled it, when it has one."""
    lora_name: str = ""
    """The LoRA adapter to run with; empty for the base model."""
    lora_path: str = ""
    """The adapter's folder, resolved inside the allowed root."""
    cache_salt: str = ""
    """vLLM's cache_salt; empty for none."""
    lora_int_id: int = 0
    """The adapter's load number (a reload gets a new one)."""
    queue_time_s: float | None = None
    """Filled in by note_timings: the scheduler's queue time, from its first message."""
    prefill_time_s: float | None = None
    """Filled in by note_timings: first scheduled to first token, from the last message."""
    decode_time_s: float | None = None
    """Filled in by note_timings: first token to last token, from the last message."""
    mm_inputs: list[common_pb2.MultiModalInput] = field(default_factory=list)
    """The prompt's processed images (chat requests with image_url parts)."""
    tokenizer_lora_path: str = ""
    """The adapter folder whose own tokenizer (added tokens) decodes this sequence; empty: the
    model's. Such sequences detokenize on the tokenizer service (per-sequence path)."""

    def to_request(self) -> scheduler_pb2.GenerateRequest:
        """The scheduler request for this sequence (Generate and Submit take the same)."""
        return scheduler_pb2.GenerateRequest(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=self.sampling,
            priority=self.priority,
            compiled_grammar=self.grammar,
            lora_name=self.lora_name,
            lora_path=self.lora_path,
            cache_salt=self.cache_salt,
            lora_int_id=self.lora_int_id,
            mm_inputs=self.mm_inputs,
        )


def note_timings(spec: SequenceSpec, resp: scheduler_pb2.GenerateResponse) -> None:
    """Keep the scheduler's phase times of the sequence that `resp` carries, for metrics."""
    if spec.queue_time_s is None and resp.HasField("queue_time_s"):
        spec.queue_time_s = resp.queue_time_s
    if resp.HasField("prefill_time_s"):
        spec.prefill_time_s = resp.prefill_time_s
        spec.decode_time_s = resp.decode_time_s


def merge_deltas(deltas: list[SequenceDelta]) -> SequenceDelta:
    """All deltas of one sequence as one (the last carries the finish state)."""
    last = deltas[-1]
    prompt_lps = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs), None)
    return SequenceDelta(
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        logprobs=[e for d in deltas for e in d.logprobs],
        num_prompt_tokens=last.num_prompt_tokens,
        prompt_logprobs=prompt_lps,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        num_cached_tokens=max(d.num_cached_tokens for d in deltas),
    )


async def run_sequence(
    clients: ServiceClients, spec: SequenceSpec, deadline: Deadline
) -> AsyncIterator[SequenceDelta]:
    """Generate one sequence; the last delta has finish_reason set. Errors propagate."""
    request = spec.to_request()
    request.heartbeat_interval_s = clients.heartbeat_interval_s
    gen = clients.scheduler.Generate(request, timeout=deadline.remaining())
    detok = _DetokenizeCall(
        clients, clients.tokenizer.DetokenizeStream(timeout=deadline.remaining())
    )
    finished_cleanly = False
    try:
        await detok.write(
            tokenizer_pb2.DetokenizeStreamRequest(
                start=tokenizer_pb2.DetokenizeStart(
                    request_id=spec.request_id,
                    prompt_token_ids=spec.prompt_token_ids,
                    skip_special_tokens=spec.skip_special_tokens,
                    stop=spec.stop,
                    include_stop_str_in_output=spec.include_stop_str_in_output,
                    lora_path=spec.tokenizer_lora_path,
                )
            )
        )
        await _read(detok)
        eos = clients.eos_token_ids
        num_prompt = len(spec.prompt_token_ids)
        # NOTE: prompt logprobs may span several messages (chunked prefill); they are
        # gathered and handed out with the first delta.
        prompt_lps: list[common_pb2.TokenLogprobs] | None = (
            [] if spec.want_prompt_logprobs else None
        )

        cached = 0

        def take_prompt_lps() -> list[common_pb2.TokenLogprobs] | None:
            nonlocal prompt_lps
            out, prompt_lps = prompt_lps, None
            return out

        while (resp := await clients.read_stream(gen, SCHEDULER)) is not grpc.aio.EOF:
            if not resp.ByteSize():
                continue  # a heartbeat: the scheduler is alive, the request quiet
            note_timings(spec, resp)
            ids = list(resp.token_ids)
            finish = resp.finish_reason
            num_prompt = resp.num_prompt_tokens or num_prompt
            cached = max(cached, resp.num_cached_tokens)
            detok_ids = ids
            if (
                finish == _FINISH.FINISH_REASON_STOP
                and ids
                and not spec.include_stop_str_in_output
                and (
                    ids[-1] in eos
                    or (resp.HasField("stop_token_id") and ids[-1] == resp.stop_token_id)
                )
            ):
                # vLLM: the token that stopped the sequence is counted but not detokenized.
                detok_ids = ids[:-1]
            new_prompt_lps = resp.prompt_logprobs if prompt_lps is not None else ()
            if new_prompt_lps:
                prompt_lps.extend(new_prompt_lps)
            fetch = _prefetch(clients, spec, resp, new_prompt_lps, deadline)
            try:
                text, stop_str, used = await _detokenize(detok, detok_ids, bool(spec.stop))
            except BaseException:
                if fetch is not None:
                    fetch.cancel()
                raise
            if fetch is not None:
                await fetch
            logprobs = list(resp.logprobs) if spec.want_logprobs else []
            if stop_str is not None:
                yield SequenceDelta(
                    text,
                    ids[:used],
                    logprobs[:used],
                    num_prompt,
                    take_prompt_lps(),
                    "stop",
                    stop_str,
                    cached,
                )
                return
            if finish == _FINISH.FINISH_REASON_UNSPECIFIED:
                if ids or text:
                    yield SequenceDelta(
                        text, ids, logprobs, num_prompt, take_prompt_lps(), num_cached_tokens=cached
                    )
                continue
            if finish == _FINISH.FINISH_REASON_ERROR:
                raise EngineError(resp.error or "unknown engine error")
            tail, stop_str = await _flush(detok)
            if stop_str is not None:
                yield SequenceDelta(
                    text + tail,
                    ids,
                    logprobs,
                    num_prompt,
                    take_prompt_lps(),
                    "stop",
                    stop_str,
                    cached,
                )
                return
            stop_reason = None
            if finish == _FINISH.FINISH_REASON_STOP and resp.HasField("stop_token_id"):
                tid = resp.stop_token_id
                stop_reason = tid if (tid in spec.stop_token_ids or tid not in eos) else None
            finished_cleanly = True
            yield SequenceDelta(
                text + tail,
                ids,
                logprobs,
                num_prompt,
                take_prompt_lps(),
                _FINISH_NAMES.get(finish, "stop"),
                stop_reason,
                cached,
            )
            return
        raise EngineError("the scheduler ended the stream without a finish reason")
    finally:
        if finished_cleanly:
            _close_in_background(gen, detok)
        else:
            gen.cancel()
            detok.cancel()


def _prefetch(
    clients: ServiceClients,
    spec: SequenceSpec,
    resp: scheduler_pb2.GenerateResponse,
    prompt_lps,
    deadline: Deadline,
) -> asyncio.Future | None:
    """Start DecodeEach for logprob ids not yet cached; None when all are (the usual case)."""
    if not (spec.want_logprobs or prompt_lps):
        return None
    wanted: list[int] = []
    if spec.want_logprobs:
        wanted.extend(_ids_in(resp.logprobs))
    if prompt_lps:
        wanted.extend(spec.prompt_token_ids)
        wanted.extend(_ids_in(prompt_lps))
    path = spec.tokenizer_lora_path
    missing = clients.missing_token_strings(wanted, path)
    if not missing:
        return None
    return asyncio.ensure_future(clients.fetch_token_strings(missing, deadline, path))


def _ids_in(entries: Iterable[common_pb2.TokenLogprobs]) -> Iterable[int]:
    for e in entries:
        yield e.token_id
        yield from e.top_token_ids


def _tokens_msg(ids: list[int]) -> tokenizer_pb2.DetokenizeStreamRequest:
    return tokenizer_pb2.DetokenizeStreamRequest(tokens=tokenizer_pb2.TokenIds(token_ids=ids))


class _DetokenizeCall:
    """A DetokenizeStream call whose reads fail as a stalled tokenizer service (503) after
    --rpc-timeout-s of silence."""

    __slots__ = ("_clients", "_call")

    def __init__(self, clients: ServiceClients, call) -> None:
        self._clients, self._call = clients, call

    async def write(self, message: tokenizer_pb2.DetokenizeStreamRequest) -> None:
        await self._call.write(message)

    async def read(self) -> tokenizer_pb2.DetokenizeStreamResponse:
        return await self._clients.read_stream(self._call, TOKENIZER_SERVICE)

    def cancel(self) -> bool:
        return self._call.cancel()

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()


async def _read(detok) -> tokenizer_pb2.DetokenizeStreamResponse:
    resp = await detok.read()
    if resp is grpc.aio.EOF:
        raise EngineError("the tokenizer service ended the detokenize stream early")
    return resp


async def _detokenize(detok, ids: list[int], split: bool) -> tuple[str, str | None, int]:
    """(new text, matched stop string or None, tokens up to and including the match)."""
    if not ids:
        return "", None, 0
    if split and len(ids) > 1:
        # NOTE: with stop strings, ids go one a message (pipelined) so a match names the exact
        # token that completed it, which is what usage counts.
        for token_id in ids:
            await detok.write(_tokens_msg([token_id]))
        parts = []
        for k in range(len(ids)):
            r = await _read(detok)
            parts.append(r.text)
            if r.stopped:
                return "".join(parts), r.stop_reason, k + 1
        return "".join(parts), None, len(ids)
    await detok.write(_tokens_msg(ids))
    r = await _read(detok)
    return r.text, (r.stop_reason if r.stopped else None), len(ids)


async def _flush(detok) -> tuple[str, str | None]:
    """End the sequence: an empty tokens message releases held-back text."""
    await detok.write(_tokens_msg([]))
    r = await _read(detok)
    with contextlib.suppress(Exception):
        await detok.done_writing()
    return r.text, (r.stop_reason if r.stopped else None)


def _close_in_background(gen, detok) -> None:
    async def close() -> None:
        # NOTE: each stream is read to its end (the server closes it right after the last
        # message), not just awaited: a client interceptor (tracing) ends its span there.
        for call in (gen, detok):
            try:
                await asyncio.wait_for(_drain_reads(call), 5.0)
            except (Exception, asyncio.CancelledError):
                call.cancel()

    task = asyncio.ensure_future(close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _drain_reads(call) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass
    await call.code()


class _Inbox:
    """A one-consumer queue of (index, delta, exception): what `asyncio.Queue` does here,
    at a fraction of its cost per item (no loop look-up, no getter list; it runs per token
    of every stream)."""

    __slots__ = ("_items", "_waiter", "sink")

    def __init__(self) -> None:
        self._items: deque[tuple] = deque()
        self._waiter: asyncio.Future | None = None
        self.sink: Callable[[tuple], tuple | None] | None = None
        """Set by the consumer while it waits on an empty queue: takes an item in the
        producer's task (None) or hands it back to be queued (the item, or one instead)."""

    def put_nowait(self, item: tuple) -> None:
        sink = self.sink
        if sink is not None:
            taken = sink(item)
            if taken is None:
                return
            # NOTE: once one item is queued, the rest queue behind it (order).
            self.sink = None
            item = taken
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> tuple:
        return self._items.popleft()

    async def get(self) -> tuple:
        while not self._items:
            # NOTE: one consumer: a cancelled get leaves the items where they are.
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class SequenceGroup:
    """The sequences of one HTTP request, each run as a task feeding one queue."""

    def __init__(
        self, clients: ServiceClients, specs: list[SequenceSpec], deadline: Deadline
    ) -> None:
        self._queue = _Inbox()
        self._live = len(specs)
        self._run = None
        self._tasks: list[asyncio.Task] = []
        router = getattr(clients, "router", None)
        # NOTE: the router decodes with the model's tokenizer only.
        if router is not None and not any(s.tokenizer_lora_path for s in specs):
            # NOTE: the batched path: the router's reader puts each delta on the queue.
            self._run = router.start(specs, deadline, self._queue.put_nowait)
            return
        self._tasks = [
            asyncio.ensure_future(self._pump(i, clients, s, deadline)) for i, s in enumerate(specs)
        ]

    async def _pump(
        self, index: int, clients: ServiceClients, spec: SequenceSpec, deadline: Deadline
    ) -> None:
        try:
            async for delta in run_sequence(clients, spec, deadline):
                self._queue.put_nowait((index, delta, None))
        except Exception as exc:  # handed to the consumer, which maps it
            if isinstance(exc, grpc.aio.AioRpcError) and deadline.expired():
                # NOTE: gRPC reports a passed deadline only best effort: a stream write that
                # races it fails with INTERNAL ("Internal error from Core"). Past our own
                # deadline, any call failure is that deadline.
                exc = request_timeout()
            self._queue.put_nowait((index, None, exc))

    async def next(
        self, sink: Callable[[tuple], tuple | None] | None = None
    ) -> tuple[int, SequenceDelta] | None:
        """The next delta of any sequence; None when all finished; a sequence's error raises.

        With `sink`, while nothing is queued, each item produced is first offered to it, in
        the producer's task: `sink((index, delta, exception))` returns None when it handled
        the delta itself (it is not returned here), or the item to queue (it declines: the
        same item, or an error instead). It must decline a sequence's last delta (the one
        with a finish reason) and errors, which this group counts."""
        if self._live == 0:
            return None
        queue = self._queue
        if sink is not None and queue.empty():
            queue.sink = sink
            try:
                index, delta, exc = await queue.get()
            finally:
                queue.sink = None
        else:
            index, delta, exc = await queue.get()
        if exc is not None:
            raise exc
        if delta.finish_reason is not None:
            self._live -= 1
        return index, delta

    def poll(self) -> tuple[int, SequenceDelta] | None:
        """The next delta if one is waiting now, else None (never waits); errors raise."""
        if self._live == 0 or self._queue.empty():
            return None
        index, delta, exc = self._queue.get_nowait()
        if exc is not None:
            raise exc
        if delta.finish_reason is not None:
            self._live -= 1
        return index, delta

    async def aclose(self) -> None:
        """Cancel every sequence still running (aborting it downstream) and wait for them."""
        if self._run is not None:
            await self._run.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
