"""The tokenizer service over gRPC (`splitserve.tokenizer.v1.TokenizerService`, grpc.aio).

Heavy calls (tokenize, decode, chat-template rendering, Prepare's prompt work) run in a thread pool so the event
loop stays free; `DetokenizeStream` work is a few microseconds per token and runs inline, as
does a small `DecodeEach` (one step's logprob tokens).
Health (`grpc.health.v1`) says NOT_SERVING until the tokenizer is loaded, then SERVING, and
NOT_SERVING again once shutdown starts. `RequestError`s become their gRPC status; anything
else becomes INTERNAL with the traceback logged (`splitserve.common.grpc_errors.ErrorInterceptor`).

DetokenizeStream protocol (one response per request message, in order):
  1. `start`: prompt ids (context), skip_special_tokens, stop strings -> an empty response.
  2. `tokens` with ids -> the text they release (`stopped`/`stop_reason` once a stop string
     matched; every later response is then empty with `stopped` set).
  3. `tokens` with no ids = end of sequence -> the held-back text, `flushed` set. A client that
     half-closes without it gets no more text; tokens after it are refused.

Prepare does a request's whole pre-generation work in one call (see `prepare.py`): chat
template or tokenization, bad words, truncation, and the structured-output constraint, which
compiles (see `grammar.py`) in its own bounded pool with a timeout and an LRU cache; a bad
constraint is INVALID_ARGUMENT and touches nothing else (health stays SERVING).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from splitserve.common import tracing
from splitserve.common.grpc_errors import ErrorInterceptor
from splitserve.common.lora import LoRAPathError, allowed_roots, parse_lora_modules
from splitserve.common.mm_limits import parse_mm_limits
from splitserve.protos import tokenizer_pb2, tokenizer_pb2_grpc

from . import memory
from .adapter_tokenizers import AdapterTokenizers
from .audio import AudioLimits
from .audio_processor import AudioPreprocessor, load_audio_preprocessor
from .chat import ChatRenderer, parse_chat_request
from .config import TokenizerServiceConfig, mm_cache_bytes
from .errors import InvalidRequest, NotReady, RequestError
from .grammar import GrammarCompiler, GrammarTokenizer, grammar_stop_ids, grammar_vocab_size
from .multimodal import ImagePreprocessor, ProcessedPrompt, load_image_preprocessor
from .prepare import (
    PART_GRAMMAR,
    PART_METADATA_KEY,
    PART_PROMPT,
    Prepared,
    bad_words_token_ids,
    finish_prompts,
    to_proto,
    tokenize_prompts,
)
from .stream import SequenceStream, StreamDelta
from .tokenizer import TokenizerHandle, load_tokenizer
from .transcription import prepare_transcription
from .whisper_processor import WhisperPreprocessor, is_whisper_folder

logger = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Extra wait past the render bound before giving up on a render stuck in C code.
_RENDER_BACKSTOP_S = 2.0
_START_RESPONSE = tokenizer_pb2.DetokenizeStreamResponse()
# DecodeEach with at most this many ids runs on the event loop (a few microseconds each).
_INLINE_DECODE_EACH = 256


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """The RPCs. Raises RequestError for refused requests; the interceptor maps them."""

    def __init__(self, config: TokenizerServiceConfig, executor: ThreadPoolExecutor):
        self._config = config
        self._executor = executor
        self._handle: TokenizerHandle | None = None
        self._renderer: ChatRenderer | None = None
        self._images: ImagePreprocessor | None = None
        """The model's processor, when the model takes images."""
        self._audio: AudioPreprocessor | None = None
        """The model's processor, when the model takes audio."""
        self._whisper: WhisperPreprocessor | None = None
        """The feature extractor and task tokens of a speech-to-text model (Whisper)."""
        self.grammars: GrammarCompiler | None = None

    def set_tokenizer(self, handle: TokenizerHandle) -> None:
        self._renderer = self._make_renderer(handle)
        self._adapter_renderers: dict[int, tuple[TokenizerHandle, ChatRenderer]] = {}
        """id(adapter tokenizer handle) -> (handle, its chat renderer)."""
        self.grammars = make_grammar_compiler(self._config, handle)
        limits = parse_mm_limits(self._config.limit_mm_per_prompt)
        trust = self._config.trust_remote_code
        self._images = load_image_preprocessor(
            handle.path, limits, mm_cache_bytes(self._config), trust
        )
        self._audio = load_audio_preprocessor(handle.path, limits, trust)
        roots = allowed_roots(self._config.lora_root, parse_lora_modules(self._config.lora_modules))
        self._adapters = AdapterTokenizers(self._config, handle, roots)
        """Tokenizers of adapter folders that have one (their added tokens)."""
        if is_whisper_folder(handle.path):
            self._whisper = WhisperPreprocessor(str(handle.path), handle.tokenizer)
        self._handle = handle

    def _make_renderer(self, handle: TokenizerHandle) -> ChatRenderer:
        return ChatRenderer(
            handle,
            self._config.trust_request_chat_template,
            self._config.chat_template_timeout_s,
            self._config.chat_template_content_format,
        )

    def _renderer_for(self, handle: TokenizerHandle) -> ChatRenderer:
        """The chat renderer of the model's tokenizer, or of an adapter's (made once)."""
        if handle is self._handle:
            return self._renderer
        kept = self._adapter_renderers.get(id(handle))
        if kept is None or kept[0] is not handle:
            if len(self._adapter_renderers) >= 2 * self._adapters.max_cached:
                self._adapter_renderers.clear()  # handles the adapter cache dropped
            kept = self._adapter_renderers[id(handle)] = (handle, self._make_renderer(handle))
        return kept[1]

    def _ready(self) -> TokenizerHandle:
        if self._handle is None:
            raise NotReady("the tokenizer is still loading")
        return self._handle

    async def _handle_for(self, lora_path: str) -> TokenizerHandle:
        """The adapter folder's tokenizer (loaded in the pool the first time), else the
        model's; an adapter folder outside the allowed roots is INVALID_ARGUMENT."""
        handle = self._ready()
        if not lora_path:
            return handle
        try:
            return await self._offload(self._adapters.get, lora_path)
        except (LoRAPathError, ValueError, OSError) as exc:
            raise InvalidRequest(f"adapter tokenizer: {exc}") from exc

    async def _offload(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def Tokenize(self, request, context):
        handle = await self._handle_for(request.lora_path)
        with tracing.span("tokenize", {"splitserve.text_chars": len(request.text)}) as span:
            ids = await self._offload(handle.encode, request.text, request.add_special_tokens)
            if span is not None:
                span.set_attribute("splitserve.num_tokens", len(ids))
        return await self._trimmed(request, tokenizer_pb2.TokenizeResponse(token_ids=ids))

    async def _trimmed(self, request, response):
        """`response`, after giving a large request's freed memory back (memory.py)."""
        if memory.is_large(request, response):
            await self._offload(memory.release_freed_memory)
        return response

    async def Detokenize(self, request, context):
        handle = await self._handle_for(request.lora_path)
        with tracing.span("detokenize", {"splitserve.num_tokens": len(request.token_ids)}):
            text = await self._offload(
                handle.decode, request.token_ids, request.skip_special_tokens
            )
        return await self._trimmed(request, tokenizer_pb2.DetokenizeResponse(text=text))

    async def Prepare(self, request, context):
        """Prompts and bad words in the tokenizer pool, the constraint in the grammar pool,
        concurrently: a request waits for the slower of the two, not for their sum."""
        handle = await self._handle_for(request.lora_path)
        if request.WhichOneof("input") == "transcription":
            return await self._prepare_transcription(request, context)
        compile_task = (
            asyncio.ensure_future(self._compile(request.grammar))
            if request.HasField("grammar")
            else None
        )
        prompt_task = asyncio.ensure_future(self._prepare_prompts(handle, request))
        response = tokenizer_pb2.PrepareResponse()
        if compile_task is not None:
            try:
                result = await compile_task
            except BaseException as exc:
                prompt_task.cancel()  # one refusal a request; its prompt work is moot
                if isinstance(exc, RequestError):
                    context.set_trailing_metadata(((PART_METADATA_KEY, PART_GRAMMAR),))
                raise
            response.grammar.CopyFrom(result.grammar)
            response.compile_seconds = result.seconds
        try:
            prompts, bad_words = await prompt_task
        except RequestError:
            context.set_trailing_metadata(((PART_METADATA_KEY, PART_PROMPT),))
            raise
        response.prompts.extend(to_proto(p) for p in prompts)
        for ids in bad_words:
            response.bad_words_token_ids.add(token_ids=ids)
        return await self._trimmed(request, response)

    async def _compile(self, spec):
        with tracing.span("compile_grammar", {"splitserve.grammar.kind": spec.kind}) as span:
            result = await self.grammars.compile(spec)
            if span is not None:
                span.set_attribute("splitserve.grammar.backend", result.grammar.backend)
                span.set_attribute("splitserve.grammar.cache_hit", result.cache_hit)
                span.set_attribute("splitserve.grammar.compile_seconds", result.seconds)
        return result

    async def _prepare_prompts(self, handle: TokenizerHandle, request):
        """(prompts, bad-word token sequences) of a Prepare request."""
        truncate = (
            request.truncate_prompt_tokens if request.HasField("truncate_prompt_tokens") else None
        )
        words = list(request.bad_words)
        chat = request.WhichOneof("input") == "chat"

        def tokenize():  # in the tokenizer pool
            p = tokenize_prompts(handle, request.prompts) if not chat else prompts
            p = finish_prompts(handle, p, truncate, request.return_prompt_text)
            return p, bad_words_token_ids(handle, words)

        # A chat request's tokenization is its template render: the same `tokenize` span.
        with tracing.span("tokenize", {"splitserve.chat_template": chat}) as span:
            prompts: list[Prepared] = []
            if chat:
                rendered = await self._render_chat(request.chat, self._renderer_for(handle))
                prompts.append(Prepared(list(rendered.token_ids), rendered.prompt))
                if isinstance(rendered, ProcessedPrompt):
                    prompts[0].mm_inputs = list(rendered.mm_inputs)
            if chat and not words and truncate is None and not request.return_prompt_text:
                bad = []  # nothing left to do: no second thread hop
            else:
                prompts, bad = await self._offload(tokenize)
            if span is not None:
                span.set_attribute("splitserve.num_tokens", sum(len(p.token_ids) for p in prompts))
        return prompts, bad

    async def _prepare_transcription(self, request, context):
        """The prompts of a speech-to-text request, one per chunk of its audio (no bad words
        or constraint: the transcription endpoints take none)."""
        try:
            if self._whisper is None:
                raise InvalidRequest("this model does not support transcription or translation")
            limits = AudioLimits(max_seconds=self._config.max_audio_seconds)
            with tracing.span("prepare_transcription") as span:
                try:
                    prompts, seconds = await self._offload(
                        prepare_transcription, self._whisper, request.transcription, limits
                    )
                except ValueError as exc:
                    raise InvalidRequest(str(exc)) from None
                if span is not None:
                    span.set_attribute("splitserve.audio_seconds", seconds)
        except RequestError:
            context.set_trailing_metadata(((PART_METADATA_KEY, PART_PROMPT),))
            raise
        response = tokenizer_pb2.PrepareResponse(audio_seconds=seconds)
        response.prompts.extend(to_proto(p) for p in prompts)
        return response

    async def _render_chat(self, request, renderer: ChatRenderer | None = None):
        """Render and tokenize chat messages (ChatInput), with `renderer` (default the
        model's); with images, process them too."""
        renderer = renderer or self._renderer
        fields = dict(
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template=request.chat_template if request.HasField("chat_template") else None,
            tools_json=request.tools_json if request.HasField("tools_json") else None,
            documents_json=(request.documents_json if request.HasField("documents_json") else None),
            chat_template_kwargs_json=(
                request.chat_template_kwargs_json
                if request.HasField("chat_template_kwargs_json")
                else None
            ),
        )

        images, audio = self._images, self._audio
        fields["image_placeholder"] = images.image_token if images is not None else None
        fields["audio_placeholder"] = audio.placeholder if audio is not None else None
        fields["content_format"] = renderer.content_format(fields["chat_template"])
        if request.images and images is None:
            raise InvalidRequest("images were sent, but this model does not take image inputs")
        if request.audio and audio is None:
            raise InvalidRequest("audio was sent, but this model does not take audio inputs")

        def parse_and_render():
            chat = parse_chat_request(request.messages_json, **fields)
            if chat.num_images != len(request.images):
                raise InvalidRequest(
                    f"messages hold {chat.num_images} image parts but {len(request.images)} "
                    "images were sent"
                )
            if chat.num_audio != len(request.audio):
                raise InvalidRequest(
                    f"messages hold {chat.num_audio} audio parts but {len(request.audio)} "
                    "audio files were sent"
                )
            if chat.num_audio:
                try:
                    return audio.process_files(
                        renderer.render_prompt(chat),
                        list(request.audio),
                        AudioLimits(max_seconds=self._config.max_audio_seconds),
                        add_special_tokens=False,
                    )
                except ValueError as exc:
                    raise InvalidRequest(f"messages: {exc}") from None
            if not chat.num_images:
                return renderer.render(chat)
            try:
                images.check_count(chat.num_images)
                return images.process_files(
                    renderer.render_prompt(chat),
                    list(request.images),
                    self._config.max_image_pixels,
                    add_special_tokens=False,
                )
            except ValueError as exc:
                raise InvalidRequest(f"messages: {exc}") from None

        timeout = self._config.chat_template_timeout_s + _RENDER_BACKSTOP_S
        try:
            return await asyncio.wait_for(self._offload(parse_and_render), timeout)
        except TimeoutError:
            # The in-thread deadline normally fires first; this is a render stuck in C code.
            raise InvalidRequest(
                f"chat template rendering exceeded {self._config.chat_template_timeout_s:g} s"
            ) from None

    async def DecodeEach(self, request, context):
        handle = await self._handle_for(request.lora_path)
        ids = request.token_ids
        if len(ids) <= _INLINE_DECODE_EACH:  # a step's logprobs: cheaper than a thread hop
            strings, raw = handle.decode_each(ids)
        else:
            strings, raw = await self._offload(handle.decode_each, ids)
        return tokenizer_pb2.DecodeEachResponse(tokens=strings, token_bytes=raw)

    async def GetDecoder(self, request, context):
        handle = self._ready()
        spec = tokenizer_pb2.DecoderSpec(
            skip_special_ids=sorted(handle.skip_ids),
            vocab_size=handle.vocab_size,
            max_stop_strings=self._config.max_stop_strings,
        )
        if handle.is_fast and handle.tokenizer_json is None:
            handle.tokenizer_json = handle.tokenizer.backend_tokenizer.to_str()
        if handle.is_fast:
            spec.tokenizer_json = handle.tokenizer_json
        return spec

    async def GetTokenizerInfo(self, request, context):
        info = self._ready().info()
        return tokenizer_pb2.TokenizerInfo(
            vocab_size=info.vocab_size,
            eos_token_id=info.eos_token_id,
            bos_token_id=info.bos_token_id,
            has_chat_template=info.has_chat_template,
            name=info.name,
            max_token_chars=info.max_token_chars,
            supports_transcription=self._whisper is not None,
        )

    async def DetokenizeStream(self, request_iterator, context):
        trace = tracing.DetokenizeTrace(__name__) if tracing.enabled() else None
        try:
            async for response in self._detokenize_stream(request_iterator, trace):
                yield response
        finally:
            if trace is not None:
                trace.emit()

    async def _detokenize_stream(self, request_iterator, trace: tracing.DetokenizeTrace | None):
        seq: SequenceStream | None = None
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind == "tokens":
                if seq is None:
                    raise InvalidRequest("the first DetokenizeStream message must carry `start`")
                ids = request.tokens.token_ids
                if trace is not None:
                    trace.num_tokens += len(ids)
                yield _stream_response(seq.push(ids) if ids else seq.finish())
            elif kind == "start":
                if seq is not None:
                    raise InvalidRequest("`start` sent twice on one DetokenizeStream")
                start = request.start
                seq = SequenceStream(
                    await self._handle_for(start.lora_path),
                    start.prompt_token_ids,
                    start.skip_special_tokens,
                    start.stop,
                    start.include_stop_str_in_output,
                    self._config.max_stop_strings,
                )
                logger.debug("detokenize stream %s started", start.request_id)
                if trace is not None:
                    trace.request_id = start.request_id
                yield _START_RESPONSE
            else:
                raise InvalidRequest("a DetokenizeStream message must carry `start` or `tokens`")


def make_grammar_compiler(
    config: TokenizerServiceConfig, handle: TokenizerHandle
) -> GrammarCompiler:
    """The constraint compiler over this tokenizer, sized by the model's vocabulary."""
    tokenizer = handle.tokenizer
    tok = GrammarTokenizer(
        tokenizer,
        grammar_vocab_size(handle.path, len(tokenizer)),
        grammar_stop_ids(handle.path, tokenizer),
    )
    return GrammarCompiler(
        tok,
        default_backend=config.guided_decoding_backend,
        cache_size=config.grammar_cache_size,
        timeout_s=config.grammar_compile_timeout_s,
        threads=config.grammar_compile_threads,
        max_pending=config.grammar_max_pending,
    )


def _stream_response(delta: StreamDelta) -> tokenizer_pb2.DetokenizeStreamResponse:
    return tokenizer_pb2.DetokenizeStreamResponse(
        text=delta.text, stopped=delta.stopped, stop_reason=delta.stop_reason, flushed=delta.flushed
    )


def _map_error(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """RequestError keeps its own status and message; anything else is INTERNAL."""
    if isinstance(exc, RequestError):
        return grpc.StatusCode[exc.status], exc.message
    return None


class TokenizerServer:
    """The gRPC server: `start(address)` to listen, `load()` to load and turn SERVING, `stop()`."""

    def __init__(self, config: TokenizerServiceConfig):
        self.config = config
        self._executor = ThreadPoolExecutor(
            config.tokenizer_threads, thread_name_prefix="tokenizer"
        )
        self.servicer = TokenizerServicer(config, self._executor)
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self, address: str) -> int:
        """Bind `address` (host:port, port 0 for any free one, or unix:path); return the port."""
        server = grpc.aio.server(
            interceptors=[ErrorInterceptor(_map_error)],
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )  # a port in use is an error, not shared
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"tokenizer service could not bind {address!r}: {exc}") from exc
        if port == 0 and not address.startswith("unix:"):
            raise OSError(f"tokenizer service could not bind {address!r}")
        await server.start()
        self._server = server
        logger.info("tokenizer service listening on %s", address)
        return port

    async def load(self) -> None:
        """Load the tokenizer in a worker thread, then report SERVING."""
        handle = await asyncio.get_running_loop().run_in_executor(
            self._executor, load_tokenizer, self.config
        )
        self.servicer.set_tokenizer(handle)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish for `grace` seconds, stop."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_s if grace is None else grace)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.servicer.grammars is not None:
            self.servicer.grammars.shutdown()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


async def run_tokenizer_service(config: TokenizerServiceConfig, address: str) -> None:
    """Serve on `address` until SIGTERM or SIGINT, then stop with `config.shutdown_grace_s`.

    Raises (so the process exits non-zero) when the address cannot be bound or the tokenizer
    cannot be loaded.
    """
    server = TokenizerServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
    try:
        await server.start(address)
        load = asyncio.ensure_future(server.load())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if load.done():
            load.result()  # a failed load raises here
            logger.info("tokenizer service ready: %s", config.tokenizer)
            await stopped
        else:
            load.cancel()
        logger.info("tokenizer service stopping")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop()
