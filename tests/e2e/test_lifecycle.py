"""--api-key, SIGTERM draining a request in flight and exiting with no orphans, and a killed
worker, each on a stack of its own (the two-rank one first checks every socket it listens on
is on loopback, test_listening_sockets.py)."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from .conftest import Server, children_of, stream_signalling, wait_for
from .test_listening_sockets import assert_every_listening_socket_is_on_loopback


def test_api_key_and_clean_sigterm(tiny_model, tmp_path):
    s = Server(
        tiny_model,
        ["--api-key", "sekrit", "--drain-timeout-s", "90", "--max-model-len", "1024"],
        tmp_path / "serve.log",
    )
    auth = {"Authorization": "Bearer sekrit"}
    try:
        body = {"model": s.model, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(s.url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(
            s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}
        )
        assert r.status_code == 401 and r.json()["error"]
        r = httpx.post(s.url + "/v1/completions", json=body, headers=auth)
        assert r.status_code == 200, r.text
        assert httpx.get(s.url + "/health").status_code == 200
        assert len(s.children) == 4  # tokenizer, worker, scheduler, gateway
        _sigterm_drains_a_stream_in_flight(s, auth)
    finally:
        code = s.stop()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert not children_of(s.proc.pid)
    for pid in s.children:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is reaped by init eventually; a live child is an orphan.
        with open(f"/proc/{pid}/status") as f:
            assert "zombie" in f.read(), f"child {pid} outlived the launcher"
    assert "sekrit" not in (tmp_path / "serve.log").read_text()


def _sigterm_drains_a_stream_in_flight(s: Server, auth: dict[str, str]) -> None:
    """Row 21: SIGTERM to `splitserve serve` with a stream in flight: the gateway keeps its
    port but answers health and new requests with 503, the stream runs to its end (the
    services behind the gateway stop only after it), then the launcher exits."""
    # NOTE: long enough (1000 tokens, with --max-model-len 1024) that the stream is still
    # running when the 503 for a new request is checked: with 200 tokens it could finish on a
    # loaded machine first, the gateway then closed its port, and the POST was refused.
    body = {"model": s.model, "prompt": "drain", "max_tokens": 1000, "ignore_eos": True}
    events = []
    with (
        httpx.Client(timeout=120, headers=auth) as h,
        h.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        events.append(next(ln for ln in lines if ln.startswith("data: "))[6:])
        s.proc.send_signal(signal.SIGTERM)

        def draining() -> bool:
            return httpx.get(s.url + "/health", timeout=5).status_code == 503

        wait_for(draining, 20, "health to turn 503")
        refused = httpx.post(s.url + "/v1/completions", json=body, headers=auth, timeout=5)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert s.proc.poll() is None
        # The services behind the gateway still answer while the gateway drains (the old
        # stop signalled them all at once: this call was refused).
        assert s.scheduler_stats().num_total_blocks > 0
        events += [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks[-2:]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(60) == 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.parametrize(
    ("pp", "tp", "victim"),
    [(1, 1, "--rank 0"), (2, 1, "--rank 0"), (1, 2, "--tp-rank 1")],
    ids=["one-rank", "pp2-rank0-killed", "tp2-peer-killed"],
)
def test_worker_killed_fails_in_flight_and_stack_exits_nonzero(
    tiny_model, tmp_path, pp, tp, victim
):
    import json
    import signal
    import subprocess
    import time

    s = Server(
        tiny_model,
        ["--pipeline-parallel-size", str(pp), "--tensor-parallel-size", str(tp)],
        tmp_path / "serve.log",
    )
    try:
        workers = [p for p in s.children if " worker " in _cmdline(p)]
        assert len(workers) == pp * tp and len(s.children) == 3 + pp * tp
        if pp == 2:
            assert_every_listening_socket_is_on_loopback(s)
        # With two stages, kill the first: the scheduler reads results from the last one,
        # which then waits on a stage that is gone. With two tensor-parallel ranks, kill the
        # peer the scheduler does not talk to: its driver's collectives fail.
        worker = next(p for p in workers if victim in _cmdline(p))
        events, killed_at = stream_signalling(s.url, s.model, 500, worker, signal.SIGKILL)
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
