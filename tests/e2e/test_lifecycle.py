"""--api-key, start-up health and SIGTERM with no orphans, on a second stack."""

from __future__ import annotations

import os

import httpx
import pytest

from .conftest import Server, wait_for


def test_api_key_and_clean_sigterm(tiny_model, tmp_path):
    s = Server(tiny_model, ["--api-key", "sekrit"], tmp_path / "serve.log")
    try:
        body = {"model": s.model, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(s.url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(
            s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}
        )
        assert r.status_code == 401 and r.json()["error"]
        r = httpx.post(
            s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"}
        )
        assert r.status_code == 200, r.text
        assert httpx.get(s.url + "/health").status_code == 200
        assert len(s.children) == 4  # tokenizer, worker, scheduler, gateway
    finally:
        code = s.stop()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    for pid in s.children:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is reaped by init eventually; a live child is an orphan.
        with open(f"/proc/{pid}/status") as f:
            assert "zombie" in f.read(), f"child {pid} outlived the launcher"
    assert "sekrit" not in (tmp_path / "serve.log").read_text()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.parametrize("pp", [1, 2], ids=["one-rank", "pp2-rank0-killed"])
def test_worker_killed_fails_in_flight_and_stack_exits_nonzero(tiny_model, tmp_path, pp):
    import json
    import signal
    import subprocess
    import time

    s = Server(tiny_model, ["--pipeline-parallel-size", str(pp)], tmp_path / "serve.log")
    try:
        workers = [p for p in s.children if " worker " in _cmdline(p)]
        assert len(workers) == pp and len(s.children) == 3 + pp
        # With two ranks, kill the first: the scheduler reads results from the last one,
        # which then waits on a stage that is gone.
        worker = next(p for p in workers if "--rank 0" in _cmdline(p))
        killed_at = None
        body = {
            "model": s.model,
            "prompt": "hi",
            "max_tokens": 500,
            "stream": True,
            "ignore_eos": True,
        }
        events = []
        with (
            httpx.Client(timeout=60) as h,
            h.stream("POST", s.url + "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        os.kill(worker, signal.SIGKILL)
                        killed_at = time.monotonic()
        assert events[-1] == "[DONE]"
        assert "error" in json.loads(events[-2]), events[-3:]
        assert time.monotonic() - killed_at < 30, "the error took too long to arrive"

        def unhealthy() -> bool:
            try:
                return httpx.get(s.url + "/health", timeout=5).status_code == 503
            except httpx.TransportError:
                return True  # the stack is already going down

        wait_for(unhealthy, 30, "/health to turn 503")
        code = s.proc.wait(60)
        assert code != 0
    except subprocess.TimeoutExpired:
        raise AssertionError("the stack did not exit after its worker died") from None
    finally:
        s.stop()
    for pid in s.children:
        status = ""
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        assert "zombie" in status, f"child {pid} outlived the launcher"
