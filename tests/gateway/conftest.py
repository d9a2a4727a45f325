"""Gateway test harness: the fakes and the gateway (uvicorn on a loopback port) share one
asyncio loop in a background thread; tests talk HTTP to it with httpx and the openai client."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from splitserve.gateway.app import build_app
from splitserve.gateway.config import GatewayConfig
from splitserve.gateway.server import http_protocol

from .fakes import FakeServices, start_fakes


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Gateway:
    url: str
    app: object
    server: uvicorn.Server
    task: object

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kw)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture(scope="session")
def fakes(loop_thread: LoopThread) -> Iterator[FakeServices]:
    services = loop_thread.run(start_fakes())
    yield services

    async def stop() -> None:
        for server in services.servers:
            await server.stop(0)

    loop_thread.run(stop())


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a condition with a deadline (for state no Condition object guards)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def start_gateway(loop_thread: LoopThread, fakes: FakeServices, **overrides) -> Gateway:
    config = GatewayConfig(
        scheduler_address=fakes.scheduler_address,
        tokenizer_address=fakes.tokenizer_address,
        port=0,
        served_model_name=["fake-model", "alias"],
        startup_timeout_s=10,
        uvicorn_log_level="warning",
        **overrides,
    )
    app = build_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            log_level="warning",
            timeout_graceful_shutdown=2,
            http=http_protocol(),  # as run_gateway serves
        )
    )
    server.capture_signals = _no_signals  # not the main thread

    async def serve() -> asyncio.Task:
        return asyncio.ensure_future(server.serve(sockets=[sock]))

    task = loop_thread.run(serve())
    wait_until(lambda: server.started or task.done(), what="gateway start")
    if task.done():
        task.result()
    return Gateway(f"http://127.0.0.1:{port}", app, server, task)


def stop_gateway(loop_thread: LoopThread, gw: Gateway) -> None:
    gw.server.should_exit = True

    async def wait() -> None:
        await asyncio.wait_for(asyncio.shield(gw.task), 10)

    loop_thread.run(wait())


class _NoSignals:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _no_signals():
    return _NoSignals()


@pytest.fixture(scope="session")
def gateway(loop_thread: LoopThread, fakes: FakeServices) -> Iterator[Gateway]:
    gw = start_gateway(loop_thread, fakes)
    yield gw
    stop_gateway(loop_thread, gw)


@pytest.fixture
def make_gateway(loop_thread: LoopThread, fakes: FakeServices):
    """A gateway with config overrides, stopped at the end of the test."""
    started: list[Gateway] = []

    def make(**overrides) -> Gateway:
        gw = start_gateway(loop_thread, fakes, **overrides)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        stop_gateway(loop_thread, gw)


@pytest.fixture(scope="session")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.client() as client:
        yield client
