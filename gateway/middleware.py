"""Pure-ASGI guards in front of the routes: body size, API key, draining."""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitserve.gateway.errors import (
    RequestError,
    error_response,
    map_exception,
    sse_error_event,
)


def _route_path(scope: Scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class BodyTooLarge(HTTPException):
    """Raised from `receive`; FastAPI lets HTTPExceptions from body reading through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or by counting streamed chunks."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                await error_response(BodyTooLarge(self.limit))(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await error_response(exc)(scope, receive, send)


PROBE_PATHS = frozenset({"/health", "/ping", "/version"})
"""Routes an orchestrator's probes call: they answer without the API key."""


class APIKeyMiddleware:
    """With --api-key, every route but the probes (and `open_paths`) needs
    `Authorization: Bearer <key>`, compared in constant time. vLLM guards only /v1; here
    /tokenize, /detokenize, /metrics, /load and the docs are guarded too, since each of them
    reaches a service or tells about the deployment."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = frozenset()):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._open = PROBE_PATHS | open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") != "OPTIONS"
            and _route_path(scope) not in self._open
        ):
            given = _header(scope, b"authorization") or b""
            if not hmac.compare_digest(given, self._expected):
                # NOTE: neither the given nor the expected key is logged or echoed.
                err = RequestError(
                    401,
                    "invalid or missing API key",
                    type="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


_UNCOUNTED = frozenset({"/health", "/ping", "/metrics", "/load"})
LOAD_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""The routes --enable-server-load-tracking counts (generation, as vLLM's load-aware calls)."""


class DrainMiddleware:
    """After SIGTERM, new requests get 503 while in-flight ones finish; counts the in-flight
    ones (what the drain waits for)."""

    def __init__(self, app: ASGIApp, state) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            err = RequestError(503, "the server is shutting down", headers={"Connection": "close"})
            await error_response(err)(scope, receive, send)
            return
        if _route_path(scope) in _UNCOUNTED:
            await self.app(scope, receive, send)
            return
        started: Message | None = None
        ended = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = message
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            await send(message)

        load = _route_path(scope) in LOAD_PATHS
        self.state.request_started(load)
        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            # NOTE: only the server's shutdown cancels a request's task, when the drain
            # timeout has passed; the handler has cancelled its gRPC calls by now (aborting
            # the work downstream). End the response as an OpenAI error, not a bare 500 or a
            # cut stream.
            if not self.state.draining or ended or not await _end_cut_short(started, send):
                raise
        finally:
            self.state.request_finished(load)


_CUT_SHORT = "the server shut down (drain timeout) before the request finished"


async def _end_cut_short(started: Message | None, send: Send) -> bool:
    """Send the end of a response cut short by shutdown; False when it cannot be ended."""
    err = RequestError(503, _CUT_SHORT)
    if started is None:
        info = map_exception(err)
        body = json.dumps(info.body).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": info.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True
    content_type = dict(started.get("headers", ())).get(b"content-type", b"")
    if not content_type.startswith(b"text/event-stream"):
        return False
    tail = sse_error_event(err) + "data: [DONE]\n\n"
    await send({"type": "http.response.body", "body": tail.encode()})
    return True


_MAX_REQUEST_ID = 256


def _usable_request_id(value: bytes | None) -> bool:
    """A client's X-Request-Id is echoed when it is 1-256 visible ASCII characters."""
    return (
        value is not None
        and 0 < len(value) <= _MAX_REQUEST_ID
        and all(0x21 <= c <= 0x7E for c in value)
    )


class RequestIdMiddleware:
    """--enable-request-id-headers: every response carries X-Request-Id, the client's own
    when it sent a usable one (so it can match logs and traces), else a new random id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if _usable_request_id(given) else uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
