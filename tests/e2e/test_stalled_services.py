"""CHECKLIST row 28, the gateway half: a scheduler or tokenizer service that stops answering
(SIGSTOP: alive, its sockets open, nothing breaks) must not hang clients. The gateway bounds
every call to them and the silence of the scheduler's output stream (heartbeats) by
--rpc-timeout-s: each client gets a 503 within it (+5 s), and /health is 503."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from .conftest import Server, wait_for
from .test_lifecycle import _cmdline

RPC_TIMEOUT_S = 3


def _unhealthy(url: str) -> bool:
    return httpx.get(url + "/health", timeout=10).status_code == 503


@pytest.fixture(scope="module")
def shared_stack(tiny_model, tmp_path_factory):
    """One stack for this file's tests: each resumes what it stopped and ends by checking the
    stack answers again, so the next finds it healthy."""
    log = tmp_path_factory.mktemp("stalled") / "serve.log"
    s = Server(tiny_model, ["--rpc-timeout-s", str(RPC_TIMEOUT_S)], log)
    yield s
    s.stop()


@pytest.fixture
def stack(shared_stack):
    stopped: list[int] = []
    try:
        yield shared_stack, stopped
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _child(s: Server, word: str) -> int:
    (pid,) = [p for p in s.children if f" {word} " in _cmdline(p)]
    return pid


def _stream(s: Server, out: dict) -> None:
    """A long streamed completion: its events, and when it ended, into `out`."""
    body = {"model": s.model, "prompt": "hi", "max_tokens": 400, "stream": True}
    body["ignore_eos"] = True
    events = out.setdefault("events", [])
    with (
        httpx.Client(timeout=120) as h,
        h.stream("POST", s.url + "/v1/completions", json=body) as r,
    ):
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    out["ended"] = time.monotonic()


def test_a_stopped_scheduler_fails_requests_within_the_rpc_timeout(stack):
    s, stopped = stack
    scheduler = _child(s, "scheduler")
    streamed: dict = {}
    reader = threading.Thread(target=_stream, args=(s, streamed), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while len(streamed.get("events", ())) < 2:  # tokens flow: the stream is open
        assert time.monotonic() < deadline, "no tokens streamed"
        assert reader.is_alive(), streamed
        time.sleep(0.05)
    os.kill(scheduler, signal.SIGSTOP)
    stopped.append(scheduler)
    stopped_at = time.monotonic()
    # A new request, streamed or not, meets the stall too (no open stream can be reused).
    r = httpx.post(
        s.url + "/v1/completions",
        json={"model": s.model, "prompt": "hi", "max_tokens": 5},
        timeout=120,
    )
    waited = time.monotonic() - stopped_at
    assert r.status_code == 503, r.text
    assert "did not answer within 3s (--rpc-timeout-s)" in r.json()["error"]["message"]
    assert waited < RPC_TIMEOUT_S + 5, f"the error took {waited:.1f}s"
    reader.join(RPC_TIMEOUT_S + 5)
    assert not reader.is_alive(), "the streamed request still hangs"
    assert streamed["ended"] - stopped_at < RPC_TIMEOUT_S + 5
    events = streamed["events"]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "scheduler did not answer" in error["message"], error
    assert _unhealthy(s.url)
    os.kill(scheduler, signal.SIGCONT)
    stopped.remove(scheduler)
    # Back without a request to prompt it: the gateway reopens its output stream itself.
    wait_for(lambda: not _unhealthy(s.url), 30, "/health back to 200")
    r = httpx.post(
        s.url + "/v1/completions",
        json={"model": s.model, "prompt": "hi", "max_tokens": 5},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_a_stopped_tokenizer_service_fails_requests_within_the_rpc_timeout(stack):
    s, stopped = stack
    tokenizer = _child(s, "tokenizer")
    body = {"model": s.model, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 200
    os.kill(tokenizer, signal.SIGSTOP)
    stopped.append(tokenizer)
    for path, payload in (
        ("/v1/completions", body),
        (
            "/v1/chat/completions",
            {"model": s.model, "messages": [{"role": "user", "content": "x"}]},
        ),
        ("/tokenize", {"model": s.model, "prompt": "hi"}),
        ("/detokenize", {"model": s.model, "tokens": [1, 2]}),
    ):
        started = time.monotonic()
        r = httpx.post(s.url + path, json=payload, timeout=120)
        waited = time.monotonic() - started
        assert r.status_code == 503, (path, r.text)
        message = r.json()["error"]["message"]
        assert "tokenizer service did not answer within 3s" in message, (path, message)
        assert waited < RPC_TIMEOUT_S + 5, f"{path}: the error took {waited:.1f}s"
    assert _unhealthy(s.url)
    os.kill(tokenizer, signal.SIGCONT)
    stopped.remove(tokenizer)
    assert httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 200
