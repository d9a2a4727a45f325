"""Server-sent events and client-disconnect handling.

A disconnect must abort the request downstream and free what it held: while a response is being
prepared, the work races a task that waits for `http.disconnect`; once streaming, Starlette
cancels the body when the client goes, and `SSEResponse` always runs its close callback.

A stream sends one body message per token. Every middleware under `DirectBodyMiddleware`
(ours, CORS, Starlette's exception layers, the route's) looks at the start message only, so
that one, the outermost user middleware, leaves the `send` it was given in the scope and
`SSEResponse` sends the body chunks there: the start and the final message still go through
the whole chain (status, headers, CORS, metrics, drain's end-of-response), the chunks skip its
six or seven send wrappers (only Starlette's error middleware and, with tracing, the
OpenTelemetry one stay outside it).

Most chunks do not even wake the response's task: while a stream waits for its next token,
the output router's reader renders and sends the token itself (`ChunkWriter.push`, see
`ServingBase._sse_body`); the task runs for the first chunk, the last ones, errors, and
when a slow client's connection makes a send wait.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from splitserve.gateway.errors import ClientDisconnected

T = TypeVar("T")

DONE = "data: [DONE]\n\n"

DIRECT_SEND = "splitserve.direct_send"
"""Scope key: the `send` the outermost middleware was given (see `DirectBodyMiddleware`)."""


def sse(payload: dict[str, Any]) -> str:
    """One SSE event. ASCII-escaped JSON: valid whatever the model emits."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


_json_str = json.encoder.encode_basestring_ascii  # what json.dumps does to a str


def _json_scalar(value: str | int | None) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return _json_str(value)
    return json.dumps(value)


class TextChunkTemplate:
    """`sse()` of a streamed completion chunk whose one choice has text, finish and stop
    reasons and nothing else (no logprobs, token ids or running usage), without building
    and encoding the dict per token: the same bytes, the constant parts rendered once.

    The chunk is {"id", "object", "created", "model", "choices": [{"index", "text",
    "logprobs": null, "finish_reason", "stop_reason"}]} and, with `usage_null`, "usage": null.
    """

    __slots__ = ("_head", "_tail", "_running_tail")

    def __init__(self, id: str, object: str, created: int, model: str, usage_null: bool):
        self._head = (
            f'data: {{"id":{_json_str(id)},"object":{_json_str(object)},"created":{created},'
            f'"model":{_json_str(model)},"choices":[{{"index":'
        )
        self._tail = ',"usage":null}\n\n' if usage_null else "}\n\n"
        self._running_tail = ',"logprobs":null,"finish_reason":null,"stop_reason":null}]' + (
            self._tail
        )
        """What follows the text of a chunk with no finish (all but a choice's last)."""

    def render_running(self, index: int, text: str) -> str:
        """`render(index, text, None, None)`: the chunk of a choice that goes on."""
        return f'{self._head}{index},"text":{_json_str(text)}{self._running_tail}'

    def render(
        self, index: int, text: str, finish_reason: str | None, stop_reason: str | int | None
    ) -> str:
        return (
            f'{self._head}{index},"text":{_json_str(text)},"logprobs":null,'
            f'"finish_reason":{_json_scalar(finish_reason)},'
            f'"stop_reason":{_json_scalar(stop_reason)}}}]{self._tail}'
        )


class ChatContentChunkTemplate:
    """`sse()` of a streamed chat chunk whose one choice adds content and nothing else (no
    role, logprobs, token ids, finish or running usage), rendered like `TextChunkTemplate`:
    {"id", "object", "created", "model", "choices": [{"index", "delta": {"content"},
    "logprobs": null, "finish_reason": null, "stop_reason": null}]} and, with `usage_null`,
    "usage": null."""

    __slots__ = ("_head", "_tail")

    def __init__(self, id: str, created: int, model: str, usage_null: bool):
        self._head = (
            f'data: {{"id":{_json_str(id)},"object":"chat.completion.chunk","created":{created},'
            f'"model":{_json_str(model)},"choices":[{{"index":'
        )
        self._tail = '},"logprobs":null,"finish_reason":null,"stop_reason":null}]' + (
            ',"usage":null}\n\n' if usage_null else "}\n\n"
        )

    def render(self, index: int, content: str) -> str:
        return f'{self._head}{index},"delta":{{"content":{_json_str(content)}{self._tail}'


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


class DirectBodyMiddleware:
    """Outermost: puts the `send` it was given in the scope under `DIRECT_SEND`.

    NOTE: only for middlewares that never change or count response body messages; a new one
    that does (compression, say) must go outside this one (tests/gateway/test_streaming.py
    lists the allowed ones)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[DIRECT_SEND] = send
        await self.app(scope, receive, send)


class ChunkWriter:
    """Where an SSE response's body chunks go, in order: `send` from the response's own
    task, or `push` from another one (the output router's reader, which then renders a
    token without waking the response's task: `ServingBase._sse_body`).

    What is pushed before the event loop's next turn goes out as one write (a batch that
    holds several tokens of a stream: one write, as when the stream's task folds them), by
    the ASGI send run right there; it finishes there unless the connection's write buffer is
    full (a slow client), when the rest of it becomes a task that every later chunk waits
    for (`ready` is False meanwhile, so pushers hand their chunks to `send`)."""

    __slots__ = ("_send", "_pending", "_blocked", "error")

    def __init__(self) -> None:
        self._send: Send | None = None
        self._pending: list[str] = []
        """Pushed chunks not written yet (a write is scheduled)."""
        self._blocked: asyncio.Task | None = None
        self.error: Exception | None = None
        """What a pushed send raised; the next `send` raises it."""

    def attach(self, send: Send) -> None:
        self._send = send

    @property
    def ready(self) -> bool:
        """A `push` now would be sent in order, without waiting."""
        return self._send is not None and self._blocked is None and self.error is None

    async def send(self, chunk: str) -> None:
        await self.flush()
        await self._send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})

    def push(self, chunk: str) -> None:
        """Send `chunk` at the loop's next turn, from any task (only while `ready`)."""
        pending = self._pending
        pending.append(chunk)
        if len(pending) == 1:
            due = _due_writers()
            due.append(self)
            if len(due) == 1:  # NOTE: one callback a batch, not one a stream
                asyncio.get_running_loop().call_soon(_write_due, due)

    def _write_pending(self) -> None:
        pending = self._pending
        if not pending:
            return  # written already (by `flush`), or dropped (`close`)
        chunk = pending[0] if len(pending) == 1 else "".join(pending)
        pending.clear()
        coro = self._send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        except Exception as exc:  # NOTE: re-raised by the response's task, as a send's error
            self.error = exc
            return
        self._blocked = asyncio.ensure_future(self._finish(coro, waiting))

    async def _finish(self, coro, waiting) -> None:
        """Run the rest of a pushed send: what a task does with what a coroutine awaits."""
        try:
            while True:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    waiting._asyncio_future_blocking = False
                    await asyncio.wait((waiting,))
                try:
                    waiting = coro.send(None)
                except StopIteration:
                    return
        except Exception as exc:
            self.error = exc
        except BaseException:
            coro.close()
            raise

    async def flush(self) -> None:
        """Write what is pushed, wait for a pushed send still under way; raise what a pushed
        send raised."""
        self._write_pending()
        if self._blocked is not None:
            await self._blocked
            self._blocked = None
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """The response ends: what is pushed and not sent is dropped."""
        self._pending.clear()
        if self._blocked is not None and not self._blocked.done():
            self._blocked.cancel()


_thread = threading.local()


def _due_writers() -> list[ChunkWriter]:
    """This thread's (so this event loop's) writers with chunks pushed and not written."""
    try:
        return _thread.due_writers
    except AttributeError:
        _thread.due_writers = due = []
        return due


def _write_due(due: list[ChunkWriter]) -> None:
    writers = due[:]
    due.clear()
    for writer in writers:
        writer._write_pending()


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always runs `on_close` (completion, error or
    disconnect), so the request's gRPC calls are cancelled whatever ends the stream. Its
    body chunks go through `writer` to the scope's `DIRECT_SEND` when there is one."""

    def __init__(
        self,
        body: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]],
        writer: ChunkWriter | None = None,
    ):
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close
        self._direct_send: Send | None = None
        self.writer = writer if writer is not None else ChunkWriter()
        """What the body may also push its chunks through (the response's task asleep)."""

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        writer = self.writer
        writer.attach(self._direct_send or send)
        try:
            async for chunk in self.body_iterator:
                await writer.send(chunk)
            await writer.flush()
        finally:
            writer.close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._direct_send = scope.get(DIRECT_SEND)
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
