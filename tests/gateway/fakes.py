"""Deterministic in-test doubles of the tokenizer and scheduler services (gateway tests only).

FakeTokenizer: byte-level vocabulary. Ids 0-255 are bytes, 256 is BOS `<s>`, 257 is EOS `</s>`.
FakeScheduler: emits the bytes of a fixed script, one token a message. Markers in the prompt
text steer it:
  #busy      RESOURCE_EXHAUSTED (queue full)        #hang    no output until cancelled
  #hold@N    N tokens, then wait until cancelled    #eos@N   EOS after N tokens
  #fail      2 tokens, then FINISH_REASON_ERROR     #multi   all tokens in one message
  #gate      no output until the test sets `FakeScheduler.gate`
  #slow      a token every 50 ms
  #say=KEY   the text `FakeScheduler.say[KEY]` (a list: item i for sequence i of n), then
             finish STOP without a stop token, as a grammar that terminated
  #cached@N  report N + 3*i prompt tokens found in the prefix cache for sequence i of n
  a NUL byte (token 0) in a prompt sent on SubmitStream ends that call with UNAVAILABLE
A pooling request (embeddings; `FakeScheduler.runner_info` says pooling) gets one message
with `fake_embedding(prompt ids)`, truncated to the request's dimensions (#busy and #hang
work there too).
Every Generate call is recorded, with whether it was cancelled, for tests to wait on. A request
submitted to a StreamOutputs stream (Submit, or SubmitStream: the gateway's batched path) is
recorded the same way: its outputs are those Generate would stream, and Abort or closing the
stream "cancels" it; SubmitStream puts a refusal on the stream as an error output.
FakeTokenizer.GetDecoder ships a Rust byte-level tokenizer that decodes as the fake does.
FakeTokenizer.Prepare renders chat messages with a fake template (a request template is refused
as untrusted), tokenizes prompts and bad words, truncates, and compiles a constraint: it checks
one as a real backend would at the level tests need (JSON syntax, schema shape, regex syntax,
choice list, a `root ::=` rule) and ships the spec itself as the "compiled" bytes. Every
Prepare request is recorded, and every RPC's method name in `FakeTokenizer.rpcs`; refusals
name their part in the trailing metadata. A spec holding #compile-timeout or #compile-busy
fails with DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED, #compile-hang never answers, and a schema
using `oneOf` is refused as a backend would refuse a feature it cannot enforce.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.protos import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from splitserve.scheduler.lora_adapters import AdapterError, AdapterTable
from splitserve.tokenizer_svc.prepare import PART_METADATA_KEY

BOS, EOS = 256, 257
TOKENIZER_VOCAB = 258
MODEL_VOCAB = 260  # embedding rows may exceed the tokenizer's size
MAX_MODEL_LEN = 256
SCRIPT = "The quick brown fox jumps over the lazy dog. "
_SPECIAL = {BOS: "<s>", EOS: "</s>"}
_HEARTBEAT = object()
FINISH = common_pb2.FinishReason


def script_for(seed: int | None) -> bytes:
    prefix = f"[seed={seed}] " if seed is not None else ""
    return (prefix + SCRIPT * 20).encode()


def encode(text: str, add_bos: bool = False) -> list[int]:
    return ([BOS] if add_bos else []) + list(text.encode("utf-8"))


def token_text(token_id: int, skip_special: bool = False) -> bytes:
    if token_id in _SPECIAL:
        return b"" if skip_special else _SPECIAL[token_id].encode()
    return bytes([token_id])


class Waiter:
    """Thread-safe records that a test can wait on with a deadline."""

    def __init__(self) -> None:
        self.cond = threading.Condition()

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self) -> None:
        self.waiter = Waiter()
        self.streams_opened = 0
        self.streams_cancelled = 0
        self.decode_each_calls: list[list[int]] = []
        self.prepare_calls: list[tokenizer_pb2.PrepareRequest] = []
        self.rpcs: list[str] = []
        """The method name of every call, in arrival order (see RpcRecorder)."""
        self.ship_decoder = True
        """GetDecoder ships the tokenizer (False: a gateway then detokenizes per sequence)."""
        self.decoder_calls = 0
        self.stalled = False
        """True: unary calls get no answer until it is False again (a stopped service)."""

    async def _wait_while_stalled(self) -> None:
        while self.stalled:
            await asyncio.sleep(0.02)

    async def Tokenize(self, request, context):
        await self._wait_while_stalled()
        return tokenizer_pb2.TokenizeResponse(
            token_ids=encode(request.text, request.add_special_tokens)
        )

    async def Detokenize(self, request, context):
        await self._wait_while_stalled()
        text = b"".join(token_text(t, request.skip_special_tokens) for t in request.token_ids)
        return tokenizer_pb2.DetokenizeResponse(text=text.decode("utf-8", "replace"))

    async def DecodeEach(self, request, context):
        ids = list(request.token_ids)
        self.decode_each_calls.append(ids)
        raw = [token_text(t) for t in ids]
        return tokenizer_pb2.DecodeEachResponse(
            tokens=[r.decode("utf-8", "replace") for r in raw], token_bytes=raw
        )

    async def Prepare(self, request, context):
        await self._wait_while_stalled()
        self.prepare_calls.append(request)
        self.waiter.notify()
        response = tokenizer_pb2.PrepareResponse()
        if request.HasField("grammar"):
            response.grammar.CopyFrom(await self._compile(request.grammar, context))
        if request.HasField("chat"):
            chat = request.chat
            if chat.HasField("chat_template"):
                await _refuse(context, "prompt", "a chat template in the request is refused")
            prompt = _render_chat(chat)
            prompts = [tokenizer_pb2.PreparedPrompt(token_ids=encode(prompt), text=prompt)]
        else:
            prompts = []
            bos = request.prompts.add_special_tokens
            for item in request.prompts.prompts:
                if item.HasField("text"):
                    ids = encode(item.text, bos)
                    prompts.append(tokenizer_pb2.PreparedPrompt(token_ids=ids, text=item.text))
                else:
                    prompts.append(tokenizer_pb2.PreparedPrompt(token_ids=item.token_ids.token_ids))
        for p in prompts:
            if request.HasField("truncate_prompt_tokens"):
                ids = list(p.token_ids)[-request.truncate_prompt_tokens :]
                del p.token_ids[:]
                p.token_ids.extend(ids)
                p.ClearField("text")
            if request.return_prompt_text and not p.HasField("text"):
                p.text = b"".join(token_text(t) for t in p.token_ids).decode("utf-8", "replace")
        response.prompts.extend(prompts)
        seen: list[list[int]] = []
        for word in request.bad_words:
            for variant in (word.lstrip(), " " + word.lstrip()):
                if encode(variant) not in seen:
                    seen.append(encode(variant))
        for ids in seen:
            response.bad_words_token_ids.add(token_ids=ids)
        return response

    @property
    def compile_calls(self) -> list[tokenizer_pb2.PrepareRequest]:
        """The Prepare calls that carried a constraint."""
        return [r for r in self.prepare_calls if r.HasField("grammar")]

    async def _compile(self, g: common_pb2.GrammarSpec, context) -> common_pb2.CompiledGrammar:
        if "#compile-timeout" in g.spec:
            await _refuse(
                context,
                "grammar",
                "grammar compile exceeded the 2.0 s limit",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        if "#compile-hang" in g.spec:
            await asyncio.Event().wait()
        if "#compile-busy" in g.spec:
            await _refuse(
                context,
                "grammar",
                "grammar compile pool is full",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        problem = grammar_problem(g)
        if problem is not None:
            await _refuse(context, "grammar", problem)
        backend = g.backend if g.backend in ("xgrammar", "guidance") else "xgrammar"
        handle = hashlib.sha256(f"{backend}\0{g.kind}\0{g.spec}".encode()).hexdigest()
        # The fake's "compiled form" is the spec itself, so tests can read it back.
        return common_pb2.CompiledGrammar(
            handle=handle, backend=backend, compiled=g.SerializeToString()
        )

    async def GetDecoder(self, request, context):
        self.decoder_calls += 1
        if not self.ship_decoder:
            return tokenizer_pb2.DecoderSpec(vocab_size=TOKENIZER_VOCAB)
        return tokenizer_pb2.DecoderSpec(
            tokenizer_json=fake_tokenizer_json(),
            skip_special_ids=[BOS, EOS],
            vocab_size=TOKENIZER_VOCAB,
            max_stop_strings=64,
        )

    async def GetTokenizerInfo(self, request, context):
        return tokenizer_pb2.TokenizerInfo(
            vocab_size=TOKENIZER_VOCAB,
            eos_token_id=EOS,
            bos_token_id=BOS,
            has_chat_template=True,
            name="fake-bytes",
            max_token_chars=max(len(token_text(t)) for t in range(TOKENIZER_VOCAB)),
        )

    async def DetokenizeStream(self, request_iterator, context):
        self.streams_opened += 1
        state = {"flushed": False}
        try:
            async for resp in self._detokenize(request_iterator, state):
                yield resp
        finally:
            if not state["flushed"]:  # ended by the client (cancelled) before its flush
                self.streams_cancelled += 1
            self.waiter.notify()

    async def _detokenize(self, request_iterator, state: dict):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        start = None
        text = ""  # all text decoded so far
        sent = 0  # characters of `text` already sent
        stopped = False
        async for req in request_iterator:
            await self._wait_while_stalled()
            if req.HasField("start"):
                start = req.start
                yield tokenizer_pb2.DetokenizeStreamResponse()
                continue
            ids = list(req.tokens.token_ids)
            final = not ids
            state["flushed"] = state["flushed"] or final
            if stopped:
                yield tokenizer_pb2.DetokenizeStreamResponse(flushed=final)
                continue
            raw = b"".join(token_text(t, start.skip_special_tokens) for t in ids)
            text += decoder.decode(raw, final=final)
            match = _first_stop(text, list(start.stop))
            if match is not None:
                pos, stop = match
                end = pos + len(stop) if start.include_stop_str_in_output else pos
                stopped = True
                yield tokenizer_pb2.DetokenizeStreamResponse(
                    text=text[sent:end], stopped=True, stop_reason=stop, flushed=final
                )
                sent = max(sent, end)
                continue
            hold = 0 if final else _held_back(text, list(start.stop))
            end = max(sent, len(text) - hold)
            yield tokenizer_pb2.DetokenizeStreamResponse(text=text[sent:end], flushed=final)
            sent = end


async def _refuse(context, part: str, message: str, code=grpc.StatusCode.INVALID_ARGUMENT):
    await context.abort(code, message, trailing_metadata=((PART_METADATA_KEY, part),))


def _render_chat(chat: tokenizer_pb2.ChatInput) -> str:
    """The fake's chat template: `<|role|>content` lines, tools and documents first."""
    parts = []
    if chat.HasField("tools_json"):
        parts.append(f"<|tools|>{len(json.loads(chat.tools_json))}\n")
    if chat.HasField("documents_json"):
        for doc in json.loads(chat.documents_json):
            parts.append(f"<|document|>{doc.get('text', '')}\n")
    for m in json.loads(chat.messages_json):
        parts.append(f"<|{m['role']}|>{m.get('content') or ''}\n")
    if chat.add_generation_prompt:
        parts.append("<|assistant|>")
    return "".join(parts)


def grammar_compiled_spec(g: common_pb2.CompiledGrammar) -> common_pb2.GrammarSpec:
    """The spec inside a CompiledGrammar the fake made."""
    return common_pb2.GrammarSpec.FromString(g.compiled)


def grammar_problem(g: common_pb2.GrammarSpec) -> str | None:
    """What a backend would refuse in this constraint, or None."""
    if g.backend not in ("", "xgrammar", "guidance", "auto"):
        return f"unknown backend {g.backend!r}"
    if g.kind == "json":
        try:
            schema = json.loads(g.spec)
        except json.JSONDecodeError as exc:
            return f"the schema is not valid JSON: {exc}"
        if not isinstance(schema, (dict, bool)):
            return "the schema must be an object or a boolean"
        if '"oneOf"' in g.spec:
            return "oneOf cannot be enforced exactly by xgrammar"
        return None
    if g.kind == "json_object":
        return None if not g.spec else "json_object takes no spec"
    if g.kind == "regex":
        try:
            re.compile(g.spec)
        except re.error as exc:
            return f"invalid regex: {exc}"
        return None
    if g.kind == "choice":
        choices = json.loads(g.spec)
        ok = isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)
        return None if ok else "choices must be a non-empty list of strings"
    if g.kind == "grammar":
        return None if "root ::=" in g.spec else "the grammar has no 'root' rule"
    return f"unknown constraint kind {g.kind!r}"


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    best = None
    for s in stops:
        pos = text.find(s)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


@dataclass
class GenerateCall:
    request: scheduler_pb2.GenerateRequest
    prompt_text: str
    emitted: int = 0
    cancelled: bool = False
    finished: bool = False
    submitted: bool = False
    """Came by Submit (the batched output stream), not by Generate."""
    started_at: float = field(default_factory=time.monotonic)


def _adapter(a) -> scheduler_pb2.LoRAAdapter:
    return scheduler_pb2.LoRAAdapter(
        lora_name=a.name, lora_path=a.path, lora_int_id=a.int_id, base_model_name=a.base_model_name
    )


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self) -> None:
        self.waiter = Waiter()
        self.calls: dict[str, GenerateCall] = {}
        self.gate = asyncio.Event()
        self.say: dict[str, str | list[str]] = {}
        self.sampling_defaults: common_pb2.SamplingDefaults | None = None
        """What GetModelInfo reports as the model's defaults (read by a gateway at start-up)."""
        self.runner_info: common_pb2.RunnerInfo | None = None
        """What GetModelInfo reports as the runner (None: generate)."""
        self.output_streams: dict[str, asyncio.Queue] = {}
        self.running: dict[str, tuple[asyncio.Task, str]] = {}
        """Submitted requests still producing: id -> (task, output stream id)."""
        self.streams_opened = 0
        self.submit_streams_opened = 0
        self.unary_submits = 0
        self.batches_sent = 0
        self.outputs_stalled = False
        """True: the output streams send nothing, heartbeats included (a stopped scheduler)."""
        self.adapters = AdapterTable()
        """The LoRA adapters (the scheduler's own table class)."""

    def calls_matching(self, needle: str) -> list[GenerateCall]:
        return [c for c in list(self.calls.values()) if needle in c.prompt_text]

    async def LoadLoRAAdapter(self, request, context):
        try:
            a = self.adapters.load(
                request.lora_name, request.lora_path, request.base_model_name, request.if_absent
            )
        except AdapterError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        return _adapter(a)

    async def UnloadLoRAAdapter(self, request, context):
        try:
            return _adapter(self.adapters.unload(request.lora_name))
        except AdapterError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)

    async def ListLoRAAdapters(self, request, context):
        return scheduler_pb2.ListLoRAAdaptersResponse(
            adapters=[_adapter(a) for a in self.adapters.list()]
        )

    async def GetModelInfo(self, request, context):
        return scheduler_pb2.ModelInfo(
            max_model_len=MAX_MODEL_LEN,
            vocab_size=MODEL_VOCAB,
            eos_token_ids=[EOS],
            model="fake/model",
            max_logprobs=20,
            sampling_defaults=self.sampling_defaults,
            runner_info=self.runner_info,
        )

    async def GetStats(self, request, context):
        return scheduler_pb2.SchedulerStats(num_total_blocks=100, num_free_blocks=100)

    async def Abort(self, request, context):
        running = self.running.get(request.request_id)
        if running is not None:
            running[0].cancel()
        return scheduler_pb2.AbortResponse(aborted=request.request_id in self.calls)

    async def Generate(self, request, context):
        prompt = bytes(t for t in request.prompt_token_ids if t < 256).decode("utf-8", "replace")
        call = GenerateCall(request, prompt)
        self.calls[request.request_id] = call
        self.waiter.notify()
        ended = False
        try:
            async for resp in self._heartbeating(
                self._generate(call, context), request.heartbeat_interval_s
            ):
                yield resp
            call.finished = ended = True
        except Exception:  # context.abort(): the fake itself ended the call
            ended = True
            raise
        finally:
            # Otherwise the client cancelled: grpc.aio cancels the task or closes the generator.
            call.cancelled = not ended
            self.waiter.notify()

    async def _next_or_heartbeat(self, queue: asyncio.Queue, interval: float | None):
        """The queue's next item, or _HEARTBEAT after `interval` seconds (> 0) without one;
        held back while `outputs_stalled` (a stopped scheduler sends not even heartbeats)."""
        try:
            async with asyncio.timeout(interval if interval and interval > 0 else None):
                item = await queue.get()
        except TimeoutError:
            item = _HEARTBEAT
        while self.outputs_stalled:
            await asyncio.sleep(0.02)
        return item

    async def _heartbeating(self, source, interval: float):
        """`source`'s responses, with an empty one every `interval` seconds (> 0) of silence,
        as the scheduler's Generate sends; nothing at all while `outputs_stalled`."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for resp in source:
                    queue.put_nowait(resp)
                queue.put_nowait(None)
            except BaseException as exc:  # handed to the handler, which re-raises it
                queue.put_nowait(exc)

        task = asyncio.ensure_future(pump())
        try:
            while True:
                item = await self._next_or_heartbeat(queue, interval)
                if item is _HEARTBEAT:
                    yield scheduler_pb2.GenerateResponse()
                elif item is None:
                    return
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            task.cancel()

    async def StreamOutputs(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        self.output_streams[request.stream_id] = queue
        self.streams_opened += 1
        interval = request.heartbeat_interval_s or None
        try:
            yield scheduler_pb2.OutputBatch()
            while True:
                first = await self._next_or_heartbeat(queue, interval)
                if first is _HEARTBEAT:
                    yield scheduler_pb2.OutputBatch()
                    continue
                if first is None:  # break_streams(): end the call as a restarting scheduler
                    return
                batch = scheduler_pb2.OutputBatch(outputs=[first])
                while not queue.empty() and queue._queue[0] is not None:
                    batch.outputs.append(queue.get_nowait())
                self.batches_sent += 1
                yield batch
        finally:
            del self.output_streams[request.stream_id]
            for task, sid in list(self.running.values()):
                if sid == request.stream_id:
                    task.cancel()

    def break_streams(self) -> None:
        """End every open output stream (call on the fakes' loop)."""
        for queue in self.output_streams.values():
            queue.put_nowait(None)

    async def Submit(self, request, context):
        queue = self.output_streams.get(request.stream_id)
        if queue is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no such output stream")
        self.unary_submits += 1
        refusal = self._start_submitted(request, queue, context)
        if refusal is not None:
            await context.abort(*refusal)
        return scheduler_pb2.SubmitResponse()

    async def SubmitStream(self, request_iterator, context):
        self.submit_streams_opened += 1
        async for request in request_iterator:
            queue = self.output_streams.get(request.stream_id)
            if queue is None:
                continue  # as the scheduler does: that stream's front end fails it
            if 0 in request.request.prompt_token_ids:  # a NUL byte: "#break-submissions"
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the submissions broke")
            refusal = self._start_submitted(request, queue, context)
            if refusal is not None:
                code, details = refusal
                queue.put_nowait(
                    scheduler_pb2.StreamedOutput(
                        request_id=request.request.request_id,
                        output=scheduler_pb2.GenerateResponse(
                            error=details, finish_reason=FINISH.FINISH_REASON_ERROR
                        ),
                        error_code=code.name,
                    )
                )
        return scheduler_pb2.SubmitResponse()

    def _start_submitted(self, request, queue: asyncio.Queue, context) -> tuple | None:
        """Start a submitted request feeding `queue`; its refusal (code, details) or None."""
        req = request.request
        prompt = bytes(t for t in req.prompt_token_ids if t < 256).decode("utf-8", "replace")
        refusal = _refusal(req, prompt)
        if refusal is not None:
            return refusal
        call = GenerateCall(req, prompt, submitted=True)
        self.calls[req.request_id] = call
        self.waiter.notify()

        async def run() -> None:
            try:
                async for resp in self._generate(call, context):
                    queue.put_nowait(
                        scheduler_pb2.StreamedOutput(request_id=req.request_id, output=resp)
                    )
                call.finished = True
            except asyncio.CancelledError:
                call.cancelled = True
            finally:
                self.running.pop(req.request_id, None)
                self.waiter.notify()

        self.running[req.request_id] = (asyncio.ensure_future(run()), request.stream_id)
        return None

    async def _generate(self, call: GenerateCall, context):
        req, prompt = call.request, call.prompt_text
        sp = req.sampling_params
        refusal = _refusal(req, prompt)
        if refusal is not None:
            await context.abort(*refusal)
        if req.pooling:
            if "#hang" in prompt:
                await asyncio.Event().wait()
            vec = fake_embedding(list(req.prompt_token_ids))
            if req.HasField("dimensions"):
                vec = vec[: req.dimensions]
            if req.HasField("normalize") and req.normalize:
                vec = [x / sum(y * y for y in vec) ** 0.5 for x in vec]
            yield scheduler_pb2.GenerateResponse(
                embedding=vec,
                num_prompt_tokens=len(req.prompt_token_ids),
                finish_reason=FINISH.FINISH_REASON_STOP,
            )
            return
        if "#hang" in prompt:
            await asyncio.Event().wait()
        if "#gate" in prompt:
            await self.gate.wait()
        hold = _marker(prompt, "hold")
        eos_at = _marker(prompt, "eos")
        script = script_for(sp.seed if sp.HasField("seed") else None)
        say = re.search(r"#say=(\w+)", prompt)
        if say:
            text = self.say[say.group(1)]
            if isinstance(text, list):
                text = text[int(req.request_id.rsplit("-", 1)[1]) % len(text)]
            script = text.encode()
        cached = _marker(prompt, "cached")
        if cached is not None:
            cached += 3 * int(req.request_id.rsplit("-", 1)[1])
        stop_ids = set(sp.stop_token_ids)
        first = True
        pending = scheduler_pb2.GenerateResponse()
        for k in range(sp.max_tokens):
            if hold is not None and k == hold:
                if pending.token_ids:
                    yield pending
                await asyncio.Event().wait()
            token = EOS if (eos_at is not None and k == eos_at) else script[k % len(script)]
            msg = pending if "#multi" in prompt else scheduler_pb2.GenerateResponse()
            msg.token_ids.append(token)
            msg.num_prompt_tokens = len(req.prompt_token_ids)
            if cached is not None:
                msg.num_cached_tokens = cached
            if sp.HasField("logprobs"):
                msg.logprobs.append(_logprobs(token, sp.logprobs))
            if first and sp.HasField("prompt_logprobs"):
                entries = [
                    _logprobs(t, sp.prompt_logprobs, rank=2) for t in req.prompt_token_ids[1:]
                ]
                if "#plpsplit" in prompt:
                    half = len(entries) // 2
                    yield scheduler_pb2.GenerateResponse(
                        prompt_logprobs=entries[:half], num_prompt_tokens=len(req.prompt_token_ids)
                    )
                    entries = entries[half:]
                msg.prompt_logprobs.extend(entries)
            first = False
            call.emitted = k + 1
            if "#fail" in prompt and k == 1:
                msg.finish_reason = FINISH.FINISH_REASON_ERROR
                msg.error = "boom"
            elif token == EOS and not sp.ignore_eos and k + 1 >= sp.min_tokens:
                msg.finish_reason = FINISH.FINISH_REASON_STOP
                msg.stop_token_id = EOS
            elif token in stop_ids and k + 1 >= sp.min_tokens:
                msg.finish_reason = FINISH.FINISH_REASON_STOP
                msg.stop_token_id = token
            elif say and k + 1 == len(script):
                msg.finish_reason = FINISH.FINISH_REASON_STOP
            elif k + 1 == sp.max_tokens:
                msg.finish_reason = FINISH.FINISH_REASON_LENGTH
            if msg.finish_reason or "#multi" not in prompt:
                yield msg
                pending = scheduler_pb2.GenerateResponse()
            if msg.finish_reason:
                return
            await asyncio.sleep(0.05 if "#slow" in prompt else 0)


def _refusal(req: scheduler_pb2.GenerateRequest, prompt: str) -> tuple | None:
    """The status a request is refused with before it is queued, or None."""
    if "#busy" in prompt:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full"
    if not req.pooling and len(req.prompt_token_ids) + req.sampling_params.max_tokens > (
        MAX_MODEL_LEN
    ):
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens: prompt + max_tokens exceeds max_model_len",
        )
    return None


def fake_tokenizer_json() -> str:
    """A Rust tokenizer whose decoding is the fake's: ids 0-255 the bytes, then <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models

    alphabet = {b: c for c, b in _byte_level_alphabet().items()}
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    assert tok.token_to_id("<s>") == BOS and tok.token_to_id("</s>") == EOS
    return tok.to_str()


def _byte_level_alphabet() -> dict[str, int]:
    from splitserve.tokenizer_svc.tokenizer import _byte_level_alphabet as table

    return table()


def fake_embedding(ids: list[int]) -> list[float]:
    """The fake's 8-float "embedding" of a prompt (exact in float32)."""
    return [
        float(len(ids)),
        float(sum(ids) % 97),
        float(ids[0]),
        float(ids[-1]),
        0.5,
        -1.0,
        2.0,
        3.0,
    ]


def _marker(prompt: str, name: str) -> int | None:
    m = re.search(rf"#{name}@(\d+)", prompt)
    return int(m.group(1)) if m else None


def _logprobs(token: int, k: int, rank: int = 1) -> common_pb2.TokenLogprobs:
    """The chosen token has logprob -0.25 (rank 1) or -1.0 (rank 2, prompts); top-k follow."""
    lp = -0.25 if rank == 1 else -1.0
    tops = [token, (token + 1) % 256, (token + 2) % 256, (token + 3) % 256][:k]
    tops += [(token + 4 + j) % 256 for j in range(max(0, k - len(tops)))]
    return common_pb2.TokenLogprobs(
        token_id=token,
        logprob=lp,
        rank=rank,
        top_token_ids=tops,
        top_logprobs=[-0.25 - j for j in range(len(tops))],
    )


class RpcRecorder(grpc.aio.ServerInterceptor):
    """Appends the method name ("Prepare", "Tokenize", ...) of every call to `into`."""

    def __init__(self, into: list[str]) -> None:
        self.into = into

    async def intercept_service(self, continuation, handler_call_details):
        self.into.append(handler_call_details.method.rsplit("/", 1)[-1])
        return await continuation(handler_call_details)


@dataclass
class FakeServices:
    tokenizer: FakeTokenizer
    scheduler: FakeScheduler
    tokenizer_address: str
    scheduler_address: str
    servers: list
    health: list


async def start_fakes() -> FakeServices:
    """Both fakes on loopback ports, each with the standard health service SERVING."""
    tok, sched = FakeTokenizer(), FakeScheduler()
    servers, healths, addresses = [], [], []
    for servicer, add in (
        (tok, tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server),
        (sched, scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server),
    ):
        server = grpc.aio.server(interceptors=[RpcRecorder(tok.rpcs)] if servicer is tok else [])
        add(servicer, server)
        h = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(h, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await h.set("", health_pb2.HealthCheckResponse.SERVING)
        servers.append(server)
        healths.append(h)
        addresses.append(f"127.0.0.1:{port}")
    return FakeServices(tok, sched, addresses[0], addresses[1], servers, healths)
