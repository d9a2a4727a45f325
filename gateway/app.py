"""The FastAPI application: OpenAI routes, vLLM's extra routes, health, metrics and guards."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, Gauge
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response

import splitserve
from splitserve.common import tracing
from splitserve.gateway.clients import TOKENIZER_SERVICE, ServiceClients
from splitserve.gateway.config import GatewayConfig
from splitserve.gateway.errors import (
    ClientDisconnected,
    RequestError,
    bad_request,
    error_response,
)
from splitserve.gateway.generation import Deadline
from splitserve.gateway.lora_registry import LoRARegistry, runtime_updates_allowed
from splitserve.gateway.metrics import GatewayMetrics, HTTPMetricsMiddleware
from splitserve.gateway.middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    DrainMiddleware,
    RequestIdMiddleware,
)
from splitserve.gateway.prepare import chat_input, check_prompt_chars, prepare
from splitserve.gateway.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ServerLoad,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)
from splitserve.gateway.request_observer import RequestObserver
from splitserve.gateway.sampling import check_token_ids
from splitserve.gateway.serving_base import ServingBase
from splitserve.gateway.serving_chat import ChatService
from splitserve.gateway.serving_completions import CompletionsService
from splitserve.gateway.serving_embeddings import (
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingsService,
)
from splitserve.gateway.serving_transcription import TranscriptionService
from splitserve.gateway.streaming import DirectBodyMiddleware, SSEResponse
from splitserve.gateway.transcription_form import speech_request_body
from splitserve.protos import tokenizer_pb2

logger = logging.getLogger(__name__)

API_KEY_ENV = "SPLITSERVE_API_KEY"
"""Where the API key may come from instead of argv (which `ps` shows); VLLM_API_KEY works too."""

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503, 504)
}
_KNOWN_PATHS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/ping",
        "/version",
        "/metrics",
        "/load",
    }
)


@dataclass
class GatewayState:
    """Mutable process state the routes and middlewares share."""

    draining: bool = False
    """Set on SIGTERM: new requests get 503 while in-flight ones finish."""
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    """Set on SIGTERM; ends a start-up still waiting for the services."""
    in_flight: int = 0
    """HTTP requests being served, /health and /metrics aside (what a drain waits for)."""
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while `in_flight` is zero."""
    server_load: int = 0
    """Completions and chat requests in flight, streams until their last event (GET /load)."""

    def __post_init__(self) -> None:
        self.idle.set()

    def begin_drain(self) -> None:
        self.draining = True
        self.stop_requested.set()

    def request_started(self, load: bool = False) -> None:
        self.in_flight += 1
        self.server_load += load
        self.idle.clear()

    def request_finished(self, load: bool = False) -> None:
        self.in_flight -= 1
        self.server_load -= load
        if self.in_flight == 0:
            self.idle.set()


def build_app(config: GatewayConfig, clients: ServiceClients | None = None) -> FastAPI:
    """The gateway app. Without `clients`, it opens (and at shutdown closes) its own channels;
    either way start-up waits until the scheduler and tokenizer answer."""
    owned = clients is None
    if clients is None:
        clients = ServiceClients(config.scheduler_address, config.tokenizer_address)
    clients.rpc_timeout_s = config.rpc_timeout_s
    metrics = GatewayMetrics(config.model_names()[0])
    state = GatewayState()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await _start_unless_stopped(clients, config.startup_timeout_s, state)
        info = clients.model_info
        if info is not None:
            config.agree_with_engine(info.engine)
            if config.enable_lora:
                await app.state.loras.start(clients.scheduler)
        metrics.set_model_name(
            config.model_names(info.model if info else "")[0], info.max_model_len if info else None
        )
        yield
        if owned:
            await clients.close()

    app = FastAPI(
        title="splitserve",
        version=splitserve.__version__,
        lifespan=lifespan,
        root_path=config.root_path,
        **(
            {"docs_url": None, "redoc_url": None, "openapi_url": None}
            if config.disable_fastapi_docs
            else {}
        ),
    )
    app.state.gateway = state
    app.state.clients = clients
    app.state.metrics = metrics
    _add_exception_handlers(app, config)
    _add_routes(app, config, clients, metrics, state)
    # Added last = outermost: direct body send (streaming.py), CORS, request id, metrics,
    # drain, body limit, API key, routes.
    api_key = config.api_key or os.environ.get(API_KEY_ENV) or os.environ.get("VLLM_API_KEY")
    if api_key:
        open_paths = frozenset({"/metrics"}) if config.disable_metrics_auth else frozenset()
        app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=open_paths)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes)
    app.add_middleware(DrainMiddleware, state=state)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, known_paths=_KNOWN_PATHS)
    if config.enable_request_id_headers:
        app.add_middleware(RequestIdMiddleware)
    Gauge(
        "splitserve_http_requests_in_flight",
        "HTTP requests being served (/health and /metrics aside).",
        registry=metrics.registry,
    ).set_function(lambda: state.in_flight)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=config.allowed_origins,
        allow_credentials=config.allow_credentials,
        allow_methods=config.allowed_methods,
        allow_headers=config.allowed_headers,
    )
    app.add_middleware(DirectBodyMiddleware)
    tracing.instrument_fastapi(app)
    return app


async def _start_unless_stopped(
    clients: ServiceClients, timeout_s: float, state: GatewayState
) -> None:
    """Wait for the services, unless a stop is requested first (then serve nothing)."""
    start = asyncio.ensure_future(clients.start(timeout_s))
    stop = asyncio.ensure_future(state.stop_requested.wait())
    try:
        done, _ = await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        start.cancel()
        raise
    finally:
        stop.cancel()
    if start in done:
        start.result()  # raises when the services never answered in time
        return
    start.cancel()
    await asyncio.gather(start, return_exceptions=True)
    logger.info("stopped while waiting for the services")


def _add_exception_handlers(app: FastAPI, config: GatewayConfig) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(exc)

    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            exc = RequestError(
                404,
                f"The endpoint {request.method} {request.url.path} is not served by splitserve",
                code="not_found",
            )
        elif exc.status_code == 405:
            exc = RequestError(
                405,
                f"Method {request.method} is not allowed on {request.url.path}",
                code="method_not_allowed",
            )
        return error_response(exc, config.retry_after_s)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


async def _guard(work: Awaitable[Response], retry_after_s: int) -> Response:
    """Every route's failure becomes an OpenAI error body; a gone client gets nothing useful."""
    try:
        return await work
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as exc:
        return error_response(exc, retry_after_s)


def _generated(model: type) -> dict[str, Any]:
    """A generation route's 200: the JSON body, or with `stream: true` server-sent events."""
    event = {
        "type": "object",
        "description": "One event: `data` is a JSON chunk, an error object, or `[DONE]`.",
        "properties": {"data": {"type": "string"}},
        "required": ["data"],
    }
    return {"model": model, "content": {"text/event-stream": {"schema": event}}}


def _add_routes(
    app: FastAPI,
    config: GatewayConfig,
    clients: ServiceClients,
    metrics: GatewayMetrics,
    state: GatewayState,
) -> None:
    loras = LoRARegistry(config)
    app.state.loras = loras
    completions = CompletionsService(config, clients, metrics, loras)
    chat = ChatService(config, clients, metrics, loras)
    base = ServingBase(config, clients, metrics, loras)
    embeddings = EmbeddingsService(config, clients, metrics, loras)
    transcriptions = TranscriptionService(config, clients, metrics, loras)
    retry = config.retry_after_s

    @app.post("/v1/completions", responses={200: _generated(CompletionResponse), **_ERRORS})
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        observer = RequestObserver(metrics, body.model or base.served_names[0], "/v1/completions")
        return _observed(observer, await _guard(completions.create(body, raw), retry))

    @app.post(
        "/v1/chat/completions", responses={200: _generated(ChatCompletionResponse), **_ERRORS}
    )
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        observer = RequestObserver(
            metrics, body.model or base.served_names[0], "/v1/chat/completions"
        )
        return _observed(observer, await _guard(chat.create(body, raw), retry))

    @app.post("/v1/embeddings", responses={200: {"model": EmbeddingResponse}, **_ERRORS})
    async def create_embedding(body: EmbeddingRequest, raw: Request) -> Response:
        observer = RequestObserver(metrics, body.model or base.served_names[0], "/v1/embeddings")
        return _observed(observer, await _guard(embeddings.create(body, raw), retry))

    for path, task in (
        ("/v1/audio/transcriptions", "transcribe"),
        ("/v1/audio/translations", "translate"),
    ):
        _add_speech_route(app, path, task, transcriptions, base, metrics, retry)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def show_models() -> ModelList:
        info = clients.model_info
        root = config.model or (info.model if info else "") or None
        names = base.served_names
        cards = [
            ModelCard(id=name, root=root, max_model_len=clients.max_model_len) for name in names
        ]
        # As vLLM: an adapter's card has its folder as root and the base model as parent.
        cards += [
            ModelCard(
                id=a.name,
                root=str(a.path),
                parent=a.base_model_name or names[0],
                max_model_len=clients.max_model_len,
            )
            for a in (await _adapters(loras))
        ]
        return ModelList(data=cards)

    if runtime_updates_allowed():
        _add_lora_routes(app, base, loras)

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse}, **_ERRORS})
    async def tokenize(body: dict[str, Any] = Body(...)) -> Response:
        return await _guard(_tokenize(base, body), retry)

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse}, **_ERRORS})
    async def detokenize(body: DetokenizeRequest) -> Response:
        return await _guard(_detokenize(base, body), retry)

    @app.get(
        "/health",
        response_class=Response,
        responses={
            # NOTE: as vLLM, a healthy answer has no body; the schema must say so.
            200: {"description": "every service is serving", "content": None},
            503: {"model": ErrorResponse},
        },
    )
    async def health() -> Response:
        if state.draining:
            return error_response(RequestError(503, "the server is shutting down"))
        serving = await clients.health()
        if all(serving.values()):
            return Response(status_code=200)
        down = ", ".join(name for name, ok in serving.items() if not ok)
        return error_response(RequestError(503, f"not serving: {down}"))

    ping_responses: dict[int | str, dict[str, Any]] = {
        # NOTE: as vLLM, a healthy answer has no body; the schema must say so.
        200: {"description": "as /health (vLLM's /ping)", "content": None},
        503: {"model": ErrorResponse},
    }

    @app.get("/ping", response_class=Response, responses=ping_responses)
    async def ping() -> Response:
        return await health()

    @app.post("/ping", response_class=Response, responses=ping_responses)
    async def ping_post() -> Response:
        return await health()

    if config.enable_server_load_tracking:

        @app.get("/load", response_model=ServerLoad)
        async def load() -> ServerLoad:
            return ServerLoad(server_load=state.server_load)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=splitserve.__version__)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def show_metrics() -> Response:
        await metrics.refresh_scheduler_stats(clients.scheduler)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _adapters(loras: LoRARegistry) -> list:
    """The scheduler's adapters for /v1/models (the last seen ones if it cannot answer now)."""
    if not loras.enabled:
        return []
    try:
        await loras.refresh()
    except grpc.aio.AioRpcError as exc:
        logger.warning("listing the scheduler's LoRA adapters failed (%s): last seen ones", exc)
    return list(loras.adapters.values())


def _add_speech_route(
    app: FastAPI,
    path: str,
    task: str,
    service: TranscriptionService,
    base: ServingBase,
    metrics: GatewayMetrics,
    retry: int,
) -> None:
    """A multipart speech-to-text route (OpenAI's form fields; see transcription_form.py)."""

    async def create_speech(raw: Request) -> Response:
        observer = RequestObserver(metrics, base.served_names[0], path)
        return _observed(observer, await _guard(service.create(raw, task), retry))

    app.post(
        path,
        responses={200: _generated(dict), **_ERRORS},
        name=f"create_{task}",
        openapi_extra={"requestBody": speech_request_body()},
    )(create_speech)


def _add_lora_routes(app: FastAPI, base: ServingBase, loras: LoRARegistry) -> None:
    """vLLM's runtime adapter routes (only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
    async def load_lora_adapter(body: dict[str, Any] = Body(...)) -> Response:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            return error_response(
                RequestError(400, "lora_name and lora_path must be strings", "lora_name")
            )
        try:
            await loras.load(name, path, base.served_names)
        except RequestError as exc:
            return error_response(exc)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
    async def unload_lora_adapter(body: dict[str, Any] = Body(...)) -> Response:
        name = body.get("lora_name")
        if not isinstance(name, str):
            return error_response(RequestError(400, "lora_name must be a string", "lora_name"))
        try:
            await loras.unload(name)
        except RequestError as exc:
            return error_response(exc)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _observed(observer: RequestObserver, response: Response) -> Response:
    """A request that ended without its stream or result (an error): close its span."""
    if not isinstance(response, SSEResponse) and response.status_code != 200:
        observer.fail(f"HTTP {response.status_code}")
    return response


async def _tokenize(base: ServingBase, body: dict[str, Any]) -> Response:
    clients = base.clients
    deadline = Deadline(base.config.request_timeout_s)
    if "messages" in body:
        chat_req = TokenizeChatRequest.model_validate(body)
        await base.check_model(chat_req.model)
        chat = await chat_input(
            chat_req.messages,
            add_generation_prompt=chat_req.add_generation_prompt,
            continue_final_message=chat_req.continue_final_message,
            chat_template=chat_req.chat_template,
            chat_template_kwargs=chat_req.chat_template_kwargs,
            tools=chat_req.tools,
            config=base.config,
        )
        lora_path = base.adapter_tokenizer(chat_req.model)
        prepared = await prepare(
            clients, tokenizer_pb2.PrepareRequest(chat=chat, lora_path=lora_path), deadline
        )
        ids, want_strs = list(prepared.prompts[0].token_ids), chat_req.return_token_strs
    else:
        req = TokenizeCompletionRequest.model_validate(body)
        await base.check_model(req.model)
        check_prompt_chars(clients, len(req.prompt), "the prompt", "prompt")
        lora_path = base.adapter_tokenizer(req.model)
        resp = await clients.unary(
            TOKENIZER_SERVICE,
            clients.tokenizer.Tokenize,
            tokenizer_pb2.TokenizeRequest(
                text=req.prompt, add_special_tokens=req.add_special_tokens, lora_path=lora_path
            ),
            deadline,
        )
        ids, want_strs = list(resp.token_ids), req.return_token_strs
    token_strs = None
    if want_strs:
        await clients.fetch_token_strings(
            clients.missing_token_strings(ids, lora_path), deadline, lora_path
        )
        token_strs = [clients.token_string(t, lora_path)[0] for t in ids]
    out = TokenizeResponse(
        count=len(ids), max_model_len=clients.max_model_len, tokens=ids, token_strs=token_strs
    )
    return Response(out.model_dump_json(), media_type="application/json")


async def _detokenize(base: ServingBase, req: DetokenizeRequest) -> Response:
    await base.check_model(req.model)
    limits = base.limits(req.model)
    check_token_ids(req.tokens, limits, "tokens")
    if len(req.tokens) > limits.max_model_len:
        raise bad_request(
            f"tokens holds {len(req.tokens)} ids, more than this model's maximum context "
            f"length of {limits.max_model_len} tokens",
            "tokens",
        )
    clients = base.clients
    resp = await clients.unary(
        TOKENIZER_SERVICE,
        clients.tokenizer.Detokenize,
        tokenizer_pb2.DetokenizeRequest(
            token_ids=req.tokens, lora_path=base.adapter_tokenizer(req.model)
        ),
        Deadline(base.config.request_timeout_s),
    )
    return Response(
        DetokenizeResponse(prompt=resp.text).model_dump_json(), media_type="application/json"
    )
