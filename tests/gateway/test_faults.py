"""Faults and lifecycle at the gateway: disconnects (row 17), deadlines (18), queue full (19),
engine errors mid-stream, health, metrics, draining, the error mapping, torch-free import."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from splitserve.gateway.errors import RequestError, map_exception

from .conftest import wait_until
from .test_completions import sse_events, tag
from .test_validation import assert_error

COMPL = "/v1/completions"
CHAT = "/v1/chat/completions"


def _all_cancelled(fakes, t: str) -> bool:
    calls = fakes.scheduler.calls_matching(t)
    return bool(calls) and all(c.cancelled for c in calls)


# ---------------------------------------------------------------- row 17


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_disconnect_mid_stream_cancels_generate(gateway, make_gateway, fakes, path, batched):
    if not batched:  # a tokenizer the service cannot ship: Generate + DetokenizeStream each
        fakes.tokenizer.ship_decoder = False
        try:
            gateway = make_gateway()
        finally:
            fakes.tokenizer.ship_decoder = True
    t = tag()
    text = f"#hold@3 {t}"
    body = {"prompt": text} if path == COMPL else {"messages": [{"role": "user", "content": text}]}
    body.update(max_tokens=50, stream=True, n=2)
    cancelled_before = fakes.tokenizer.streams_cancelled
    opened_before = fakes.tokenizer.streams_opened
    with gateway.client() as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        # NOTE: keep the line iterator referenced: closing it closes the connection.
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"]
        assert not _all_cancelled(fakes, t)
    # The client is gone: both sequences are aborted in the scheduler.
    assert fakes.scheduler.waiter.wait_for(lambda: _all_cancelled(fakes, t))
    assert len(fakes.scheduler.calls_matching(t)) == 2
    if batched:  # detokenized in the gateway: no call to the tokenizer service at all
        assert fakes.tokenizer.streams_opened == opened_before
    else:  # and both detokenize streams are cancelled
        assert fakes.tokenizer.waiter.wait_for(
            lambda: fakes.tokenizer.streams_cancelled >= cancelled_before + 2
        )


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_while_queued_cancels_generate(gateway, fakes, stream):
    t = tag()
    body = json.dumps({"prompt": f"#hang {t}", "max_tokens": 5, "stream": stream}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        assert fakes.scheduler.waiter.wait_for(lambda: fakes.scheduler.calls_matching(t))
    assert fakes.scheduler.waiter.wait_for(lambda: _all_cancelled(fakes, t))


# ---------------------------------------------------------------- rows 18, 19, engine errors


@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_503_with_retry_after(http, stream):
    r = http.post(COMPL, json={"prompt": "#busy", "stream": stream})
    assert_error(r, 503)
    assert r.headers["retry-after"] == "1"


def test_queue_full_with_openai_client(gateway):
    import openai

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="fake-model", prompt="#busy")
    assert info.value.status_code == 503


@pytest.mark.parametrize("stream", [False, True])
def test_deadline_is_504_and_aborts_downstream(make_gateway, fakes, stream):
    gw = make_gateway(request_timeout_s=0.3)
    t = tag()
    with gw.client() as c:
        r = c.post(COMPL, json={"prompt": f"#hang {t}", "stream": stream})
    assert_error(r, 504)
    assert fakes.scheduler.waiter.wait_for(lambda: _all_cancelled(fakes, t))


def test_call_failing_past_the_deadline_is_504_whatever_grpc_says():
    """gRPC reports a passed deadline best effort: a stream write racing it fails with
    INTERNAL. Past the request's own deadline that is still the 504, not a 500."""
    import asyncio

    from splitserve.gateway.generation import Deadline, SequenceGroup, SequenceSpec
    from splitserve.protos import common_pb2

    core_error = _rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core")

    class Call:
        def cancel(self) -> None:
            pass

        async def write(self, _msg) -> None:
            raise core_error

    class Stubs:
        def Generate(self, *_a, **_kw):
            return Call()

        def DetokenizeStream(self, *_a, **_kw):
            return Call()

    class Clients:
        scheduler = tokenizer = Stubs()
        heartbeat_interval_s = rpc_timeout_s = 60.0

    async def first_error(timeout_s: float) -> BaseException:
        spec = SequenceSpec("r-1", [1, 2], common_pb2.SamplingParams(max_tokens=4))
        group = SequenceGroup(Clients(), [spec], Deadline(timeout_s))
        try:
            await group.next()
        except Exception as exc:
            return exc
        finally:
            await group.aclose()
        raise AssertionError("no error")

    past = asyncio.run(first_error(0.0))
    assert map_exception(past).status == 504
    assert map_exception(past).body["error"]["type"] == "timeout_error"
    within = asyncio.run(first_error(600.0))  # not past the deadline: a real INTERNAL
    assert within is core_error and map_exception(within).status == 500


def test_engine_error_non_stream_is_500(http):
    err = assert_error(http.post(COMPL, json={"prompt": "#fail", "max_tokens": 10}), 500)
    assert "boom" in err["message"]


def test_engine_error_mid_stream_is_sse_error_then_done(http):
    r = http.post(COMPL, json={"prompt": "#fail", "max_tokens": 10, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)  # asserts the final [DONE]
    assert events[0]["choices"][0]["text"] == "T"
    assert set(events[-1]) == {"error"} and "boom" in events[-1]["error"]["message"]


# ---------------------------------------------------------------- health, metrics, drain


def test_health_follows_the_services(http, fakes, loop_thread):
    assert http.get("/health").status_code == 200
    tok_health = fakes.health[0]
    loop_thread.run(tok_health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    try:
        err = assert_error(http.get("/health"), 503)
        assert "tokenizer" in err["message"]
    finally:
        loop_thread.run(tok_health.set("", health_pb2.HealthCheckResponse.SERVING))
    assert http.get("/health").status_code == 200


def test_metrics(http):
    http.post(COMPL, json={"prompt": "Hello", "max_tokens": 3})
    http.post(COMPL, json={"prompt": "Hello", "max_tokens": 3, "stream": True})
    text = http.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    m = '{model_name="fake-model"}'
    assert values[f"vllm:prompt_tokens_total{m}"] >= 12
    assert values[f"vllm:generation_tokens_total{m}"] >= 6
    assert values[f"vllm:time_to_first_token_seconds_count{m}"] >= 2
    assert values['splitserve_http_requests_total{endpoint="/v1/completions",status="200"}'] >= 2
    assert (
        values['vllm:request_success_total{finished_reason="length",model_name="fake-model"}'] >= 2
    )
    # The fake scheduler's GetStats: 100 blocks, all free.
    assert values[f"vllm:kv_cache_usage_perc{m}"] == 0.0
    assert values[f"vllm:num_requests_waiting{m}"] == 0


def test_draining_refuses_new_requests(make_gateway):
    gw = make_gateway()
    gw.app.state.gateway.draining = True
    with gw.client() as c:
        assert_error(c.post(COMPL, json={"prompt": "x"}), 503)
        assert c.get("/health").status_code == 503


def _fake_backed_gateway(fakes, drain_timeout_s: float) -> tuple[subprocess.Popen, str]:
    """`run_gateway` in its own process (real signal handling) over the fakes, healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import asyncio, sys
        sys.modules["torch"] = None
        from splitserve.gateway.config import GatewayConfig
        from splitserve.gateway.server import run_gateway
        asyncio.run(run_gateway(GatewayConfig(
            port={port}, scheduler_address="{fakes.scheduler_address}",
            tokenizer_address="{fakes.tokenizer_address}", uvicorn_log_level="warning",
            drain_timeout_s={drain_timeout_s})))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            assert proc.poll() is None, "gateway exited"
            return False

    try:
        wait_until(ready, timeout=30, what="gateway health")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def _assert_draining(url: str) -> None:
    """Still listening (a load balancer sees it): health and new requests are 503."""
    assert_error(httpx.get(url + "/health", timeout=5), 503)
    err = assert_error(httpx.post(url + COMPL, json={"prompt": "x"}, timeout=5), 503)
    assert "shutting down" in err["message"]


@pytest.mark.timeout(90)
def test_run_gateway_sigterm_drains_and_exits_zero(fakes, loop_thread):
    """SIGTERM: health and new requests 503, the in-flight request still completes, then
    the process exits 0 (row 21)."""
    proc, url = _fake_backed_gateway(fakes, drain_timeout_s=20)
    t = tag()
    result: dict = {}
    try:
        loop_thread.loop.call_soon_threadsafe(fakes.scheduler.gate.clear)

        def in_flight() -> None:
            r = httpx.post(url + COMPL, json={"prompt": f"#gate {t}", "max_tokens": 4}, timeout=30)
            result["status"], result["body"] = r.status_code, r.json()

        worker = threading.Thread(target=in_flight)
        worker.start()
        assert fakes.scheduler.waiter.wait_for(lambda: fakes.scheduler.calls_matching(t))
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refuses(url), timeout=10, what="new requests refused")
        _assert_draining(url)
        assert proc.poll() is None, "the gateway exited with a request in flight"
        loop_thread.loop.call_soon_threadsafe(fakes.scheduler.gate.set)
        worker.join(30)
        assert result["status"] == 200 and result["body"]["choices"][0]["text"] == "The "
        assert proc.wait(30) == 0
        assert not fakes.scheduler.calls_matching(t)[0].cancelled
    finally:
        loop_thread.loop.call_soon_threadsafe(fakes.scheduler.gate.set)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
def test_run_gateway_drain_timeout_cancels_in_flight_and_exits_zero(fakes):
    """Requests still running when the drain timeout passes are cancelled (aborted in the
    scheduler), and the gateway still exits 0 (row 21)."""
    proc, url = _fake_backed_gateway(fakes, drain_timeout_s=1.0)
    t = tag()
    outcome: dict = {}

    def in_flight(stream: bool) -> None:
        body = {"prompt": f"#hold@2 {t}", "max_tokens": 8, "stream": stream}
        try:
            r = httpx.post(url + COMPL, json=body, timeout=30)
            outcome[stream] = (r.status_code, r.text)
        except httpx.HTTPError as exc:
            outcome[stream] = exc

    clients = [threading.Thread(target=in_flight, args=(s,)) for s in (False, True)]
    try:
        for c in clients:
            c.start()
        # NOTE: the fake notifies on calls starting and ending, not per token: poll.
        wait_until(
            lambda: sum(c.emitted == 2 for c in fakes.scheduler.calls_matching(t)) == 2,
            what="two tokens generated by each request",
        )
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refuses(url), timeout=10, what="new requests refused")
        _assert_draining(url)
        assert proc.wait(30) == 0
        assert fakes.scheduler.waiter.wait_for(lambda: _all_cancelled(fakes, t))
        for c in clients:
            c.join(30)
        # An OpenAI error: a 503 body, or (the 200 already sent) an SSE error event + [DONE].
        status, text = outcome[False]
        assert status == 503 and "drain timeout" in json.loads(text)["error"]["message"]
        status, text = outcome[True]
        assert status == 200
        events = sse_events(text)  # asserts the final [DONE]
        assert events[0]["choices"][0]["text"] == "T"
        assert "drain timeout" in events[-1]["error"]["message"], events[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
def test_run_gateway_second_sigterm_stops_at_once(fakes):
    """A second signal during a long drain: the in-flight request is cut short with the
    OpenAI 503 body and aborted in the scheduler, and the gateway exits 0."""
    proc, url = _fake_backed_gateway(fakes, drain_timeout_s=600)
    t = tag()
    outcome: dict = {}

    def in_flight() -> None:
        r = httpx.post(url + COMPL, json={"prompt": f"#hang {t}"}, timeout=60)
        outcome["status"], outcome["body"] = r.status_code, r.json()

    client = threading.Thread(target=in_flight)
    try:
        client.start()
        assert fakes.scheduler.waiter.wait_for(lambda: fakes.scheduler.calls_matching(t))
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refuses(url), timeout=10, what="new requests refused")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        client.join(30)
        assert outcome["status"] == 503 and "shut down" in outcome["body"]["error"]["message"]
        assert fakes.scheduler.waiter.wait_for(lambda: _all_cancelled(fakes, t))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _gateway_process(scheduler_address: str, **overrides) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import asyncio
        from splitserve.gateway.config import GatewayConfig
        from splitserve.gateway.server import run_gateway
        asyncio.run(run_gateway(GatewayConfig(
            port={port}, scheduler_address="{scheduler_address}",
            tokenizer_address="{scheduler_address}", uvicorn_log_level="info",
            **{overrides!r})))
    """)
    return subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


@pytest.mark.timeout(90)
def test_startup_failure_exits_non_zero():
    proc = _gateway_process(_dead_address(), startup_timeout_s=0.5)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "did not answer before the start-up timeout" in err


@pytest.mark.timeout(90)
def test_sigterm_during_startup_exits_zero():
    proc = _gateway_process(_dead_address(), startup_timeout_s=600)
    try:
        for line in proc.stderr:  # uvicorn's own log line: start-up has begun
            if "Waiting for application startup" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _refuses(url: str) -> bool:
    try:
        return httpx.post(url + COMPL, json={"prompt": "x"}, timeout=2).status_code == 503
    except httpx.TransportError:
        return True


# ---------------------------------------------------------------- mapping, import


def _rpc_error(code: grpc.StatusCode, details: str = "d") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    "code,status",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 503),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNKNOWN, 500),
    ],
)
def test_grpc_status_mapping(code, status):
    info = map_exception(_rpc_error(code, "max_tokens: too large"))
    assert info.status == status
    assert set(info.body["error"]) == {"message", "type", "param", "code"}
    if status == 400:
        assert info.body["error"]["param"] == "max_tokens"
        assert "too large" in info.body["error"]["message"]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert info.headers["Retry-After"] == "1"


def test_request_error_and_unexpected_mapping():
    info = map_exception(RequestError(400, "bad", param="n", code="c"))
    assert (info.status, info.body["error"]["param"], info.body["error"]["code"]) == (400, "n", "c")
    info = map_exception(KeyError("secret internals"))
    assert info.status == 500 and "secret" not in info.body["error"]["message"]


def test_gateway_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; import splitserve.gateway.app, "
        "splitserve.gateway.server; assert 'torch' not in [m for m in sys.modules "
        "if sys.modules[m] is not None]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_config_checks_name_the_value():
    from splitserve.gateway.config import GatewayConfig

    with pytest.raises(ValueError, match="70000"):
        GatewayConfig(port=70000)
    with pytest.raises(ValueError, match="max_n.*0"):
        GatewayConfig(max_n=0)
    with pytest.raises(ValueError, match="-1"):
        GatewayConfig(request_timeout_s=-1)
    assert "hunter2" not in repr(GatewayConfig(api_key="hunter2"))
    assert GatewayConfig(served_model_name="m").served_model_name == ["m"]
