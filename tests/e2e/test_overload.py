"""Faults under load on the real `splitserve serve` stack (CHECKLIST rows 18 and 25): a
gateway whose request timeout is shorter than the generation, and bursts at unlimited rate
against the session stack's small waiting queue (32 running + 16 waiting). SIGTERM with a
request in flight (row 21) is in test_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import httpx
import pytest

from .conftest import free_port, wait_for

IDLE_TIMEOUT = 30


@pytest.fixture(scope="module")
def stack(server):
    server.idle_free_blocks = server.scheduler_stats().num_total_blocks
    return server


def _scheduler_idle(stack) -> bool:
    st = stack.scheduler_stats()
    return (
        st.num_running == 0 and st.num_waiting == 0 and st.num_free_blocks == stack.idle_free_blocks
    )


def _gateway_in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("splitserve_http_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no splitserve_http_requests_in_flight in /metrics")


def _long_body(stack, stream: bool = False, max_tokens: int = 480) -> dict:
    return {
        "model": stack.model,
        "prompt": "a long answer",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


# ---------------------------------------------------------------- row 18


@pytest.mark.timeout(180)
def test_request_timeout_is_504_and_frees_the_scheduler(stack, tmp_path):
    """A gateway whose gRPC deadline (--request-timeout-s) is shorter than the generation:
    504 OpenAI error, and the scheduler aborts the request (its blocks are free again)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "gateway.log").open("w")
    gw = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitserve.entrypoints.cli",
            "gateway",
            "--port",
            str(port),
            "--scheduler-address",
            stack.scheduler_address,
            "--tokenizer-address",
            stack.tokenizer_address,
            "--request-timeout-s",
            "0.5",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "the second gateway", gw)
        r = httpx.post(url + "/v1/completions", json=_long_body(stack), timeout=60)
        assert r.status_code == 504, r.text
        err = r.json()["error"]
        assert err["type"] == "timeout_error" and "timeout" in err["message"]
        wait_for(lambda: _scheduler_idle(stack), IDLE_TIMEOUT, "the scheduler to go idle")
        # Streamed, once the 200 is sent, the deadline ends it with an error event.
        r = httpx.post(url + "/v1/completions", json=_long_body(stack, True), timeout=60)
        if r.status_code == 200:
            events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == 504, events[-3:]
        else:
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        wait_for(lambda: _scheduler_idle(stack), IDLE_TIMEOUT, "the scheduler to go idle")
        # The stack's own gateway (no deadline) still serves the same request in full.
        r = httpx.post(
            stack.url + "/v1/completions", json=_long_body(stack, max_tokens=64), timeout=120
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64
    finally:
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(30) == 0


def test_scheduler_grpc_deadline_aborts_the_request(stack):
    """A direct gRPC client of the scheduler (the public Generate API) with a deadline
    shorter than the generation: DEADLINE_EXCEEDED, and the request's blocks are freed."""
    import grpc

    from splitserve.protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc

    req = scheduler_pb2.GenerateRequest(
        request_id="deadline-direct",
        prompt_token_ids=list(range(5, 40)),
        sampling_params=common_pb2.SamplingParams(max_tokens=470, ignore_eos=True),
    )
    got = 0
    with grpc.insecure_channel(stack.scheduler_address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            for resp in stub.Generate(req, timeout=0.2):
                got += len(resp.token_ids)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got < 470, got
    wait_for(lambda: _scheduler_idle(stack), IDLE_TIMEOUT, "the scheduler to go idle")


# ---------------------------------------------------------------- row 25


async def _burst(stack, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=stack.url, limits=limits, timeout=300) as h:

        async def one(i: int) -> httpx.Response:
            body = {
                "model": stack.model,
                "prompt": f"burst request {i}",
                "max_tokens": 24,
                "ignore_eos": True,
                "stream": i % 4 == 0,
            }
            return await h.post("/v1/completions", json=body)

        return await asyncio.gather(*(one(i) for i in range(n)))


def _check_burst(stack, responses: list[httpx.Response]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in responses:
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        if r.status_code in (429, 503):
            assert int(r.headers["retry-after"]) >= 0, r.headers
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif r.status_code == 200:
            if r.headers["content-type"].startswith("text/event-stream"):
                events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
                assert events[-1] == "[DONE]"
                assert not any("error" in json.loads(e) for e in events[:-1]), events
            else:
                assert r.json()["usage"]["completion_tokens"] == 24
        else:
            raise AssertionError(f"undeliberate status {r.status_code}: {r.text[:500]}")
    return counts


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.timeout(300)
def test_burst_only_deliberate_refusals_and_back_to_idle(stack):
    """200 requests at once against 48 admission slots: each is a 200 or a 503 with
    Retry-After, never another 5xx; then the scheduler and gateway are idle again. The first
    burst warms the processes up; two more must not grow their memory (a loose bound)."""
    rss = []
    for _ in range(3):
        counts = _check_burst(stack, asyncio.run(_burst(stack, 200)))
        assert counts.get(200, 0) > 0 and counts.get(503, 0) > 0, counts
        wait_for(lambda: _scheduler_idle(stack), IDLE_TIMEOUT, "the scheduler to go idle")
        wait_for(lambda: _gateway_in_flight(stack.url) == 0, IDLE_TIMEOUT, "the gateway to go idle")
        rss.append({pid: _rss_kib(pid) for pid in stack.children})
    growth = {pid: rss[-1][pid] - rss[0][pid] for pid in stack.children}
    # NOTE: loose on purpose (allocator noise, measured at most ~5 MiB here); keeping each
    # of 400 requests' state (prompts, streams, queues) would exceed it.
    assert max(growth.values()) < 32 * 1024, (growth, rss)
    assert httpx.get(stack.url + "/health").status_code == 200
