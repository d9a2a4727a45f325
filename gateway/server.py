"""Serving the gateway with uvicorn; SIGTERM drains: health and new requests 503, in-flight
ones finish (cancelled after the drain timeout), then the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
import socket
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import uvicorn

from splitserve.gateway.app import build_app
from splitserve.gateway.clients import ServiceClients
from splitserve.gateway.config import GatewayConfig

logger = logging.getLogger(__name__)

_CANCEL_GRACE_S = 1.0
"""After the drain, how long uvicorn waits for request tasks before cancelling them."""


class _DrainingServer(uvicorn.Server):
    """uvicorn, but a signal flips the app to draining and the process exits normally
    (uvicorn would re-raise the signal after shutting down)."""

    def __init__(self, config: uvicorn.Config, app_state, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app_state = app_state
        self._drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.begin_drain, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signal support: the caller stops us
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def begin_drain(self, sig: int | None = None) -> None:
        """Health and new requests get 503 (the port stays open, so a load balancer sees
        it), in-flight ones finish; the server exits when none is left or after the drain
        timeout, cancelling (so aborting downstream) those still running. A second signal
        stops at once."""
        if self._app_state.draining:
            logger.info("second signal %s: stopping without waiting for in-flight requests", sig)
            self.force_exit = sig == signal.SIGINT
            self.config.timeout_graceful_shutdown = 0
            self.should_exit = True
            return
        logger.info(
            "draining (signal %s): %d request(s) in flight, up to %.1f s",
            sig,
            self._app_state.in_flight,
            self._drain_timeout_s,
        )
        self._app_state.begin_drain()
        self._drain_task = asyncio.ensure_future(self._exit_when_idle())

    async def _exit_when_idle(self) -> None:
        try:
            await asyncio.wait_for(self._app_state.idle.wait(), self._drain_timeout_s)
        except TimeoutError:
            logger.warning(
                "drain timeout (%.1f s) passed with %d request(s) in flight; cancelling them",
                self._drain_timeout_s,
                self._app_state.in_flight,
            )
        # NOTE: whatever still runs now is past the drain timeout: uvicorn cancels it after
        # this grace, which cancels its gRPC calls and so aborts it in the scheduler.
        self.config.timeout_graceful_shutdown = _CANCEL_GRACE_S
        self.should_exit = True


MAX_REQUEST_HEAD_BYTES = 16 * 1024
"""The most bytes of a request head (request line and headers) the gateway reads: h11's
default bound, which the httptools protocol gets from `_bounded_httptools`."""


def http_protocol() -> str | type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 implementation: httptools (C, as vLLM serves) with h11's bound on
    the request head when httptools is installed, else h11 (pure Python, several times the
    CPU per streamed chunk)."""
    if importlib.util.find_spec("httptools") is None:
        return "h11"
    return _bounded_httptools()


_HEAD_TOO_LARGE = b"Request header fields too large"


def _bounded_httptools() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, refusing (431, connection closed) a request head
        still incomplete after MAX_REQUEST_HEAD_BYTES: httptools alone buffers a head of
        any size, where h11 stops at its bound."""

        _in_head = True
        _head_bytes = 0

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                # NOTE: counts whole reads, so a read that also holds the end of the previous
                # request's body counts too: at most one read too many.
                self._head_bytes += len(data)
                if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                    self._refuse_head()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def _refuse_head(self) -> None:
            logger.warning("request head over %d bytes: refused", MAX_REQUEST_HEAD_BYTES)
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (len(_HEAD_TOO_LARGE), _HEAD_TOO_LARGE)
            )
            self.transport.close()

    return BoundedHttpToolsProtocol


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (as vLLM's server runs), else None (asyncio's)."""
    if importlib.util.find_spec("uvloop") is None:
        return None
    import uvloop

    return uvloop.new_event_loop


def run_until_complete(main: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run(main)`, on the event loop `event_loop_factory` picks."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(main)


def uvicorn_config(app, config: GatewayConfig) -> uvicorn.Config:
    """uvicorn's settings for `app`: address, logging, TLS, the drain timeout and the HTTP
    implementation. (The event loop is the caller's: `run_until_complete` picks it.)"""
    return uvicorn.Config(
        app,
        http=http_protocol(),
        host=config.host,
        port=config.port,
        root_path=config.root_path,
        log_level=config.uvicorn_log_level,
        access_log=not config.disable_uvicorn_access_log,
        lifespan="on",
        timeout_graceful_shutdown=config.drain_timeout_s,
        proxy_headers=False,
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        ssl_ca_certs=config.ssl_ca_certs,
        ssl_cert_reqs=config.ssl_cert_reqs,
    )


async def run_gateway(
    config: GatewayConfig, clients: ServiceClients | None = None, sock: socket.socket | None = None
) -> None:
    """Serve until SIGTERM/SIGINT, then drain for up to `drain_timeout_s` and return.
    Raises RuntimeError when start-up fails, so the process exits non-zero."""
    app = build_app(config, clients)
    uv_config = uvicorn_config(app, config)
    server = _DrainingServer(uv_config, app.state.gateway, config.drain_timeout_s)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # Accepted connections inherit it; without it small responses wait on delayed ACKs.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await server.serve(sockets=[sock] if sock is not None else None)
    if not server.started:
        # uvicorn returns quietly when start-up fails (services never answered, port taken).
        raise RuntimeError("the gateway failed to start; see the log above")
