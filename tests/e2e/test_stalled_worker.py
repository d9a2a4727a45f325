"""CHECKLIST row 28, the worker half: a worker that stops answering (SIGSTOP: alive, its
sockets open, nothing breaks) must not hang clients. After --worker-step-timeout-s without a
step result the scheduler fails every in-flight request (an SSE error event, then [DONE]),
/health turns 503 and `serve` exits non-zero, as for a dead worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx

from .conftest import Server, stream_signalling, wait_for
from .test_lifecycle import _cmdline

STEP_TIMEOUT_S = 3


def test_a_stopped_worker_fails_requests_within_the_step_timeout(tiny_model, tmp_path):
    s = Server(
        tiny_model,
        ["--worker-step-timeout-s", str(STEP_TIMEOUT_S)],
        tmp_path / "serve.log",
    )
    (worker,) = [p for p in s.children if " worker " in _cmdline(p)]
    try:
        events, stopped_at = stream_signalling(s.url, s.model, 400, worker, signal.SIGSTOP)
        waited = time.monotonic() - stopped_at
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503, error  # the reason is in the log, checked below
        assert waited < STEP_TIMEOUT_S + 5, f"the error took {waited:.1f}s"

        def unhealthy() -> bool:
            try:
                return httpx.get(s.url + "/health", timeout=5).status_code == 503
            except httpx.TransportError:
                return True  # the stack is already going down

        wait_for(unhealthy, 10, "/health to turn 503")
        assert s.proc.wait(60) != 0
    except subprocess.TimeoutExpired:
        raise AssertionError("the stack did not exit after its worker stalled") from None
    finally:
        try:
            os.kill(worker, signal.SIGCONT)
        except ProcessLookupError:
            pass
        s.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "within 3s (--worker-step-timeout-s): a worker rank is stalled" in log
