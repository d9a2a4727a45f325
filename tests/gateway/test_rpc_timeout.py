"""CHECKLIST row 28, the gateway half, against the fakes: --rpc-timeout-s bounds every call to
a service that stopped answering and the silence of the scheduler's output stream; the client
gets a 503 naming the service, /health is 503 while it stays silent, and it recovers after."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from splitserve.protos import common_pb2

from .conftest import wait_until

COMPL = "/v1/completions"
TIMEOUT_S = 0.5


@pytest.fixture
def stalled_tokenizer(fakes):
    fakes.tokenizer.stalled = True
    yield fakes.tokenizer
    fakes.tokenizer.stalled = False


@pytest.fixture
def stalled_outputs(fakes):
    fakes.scheduler.outputs_stalled = True
    yield fakes.scheduler
    fakes.scheduler.outputs_stalled = False


def _assert_stalled(r, service: str, started: float) -> None:
    waited = time.monotonic() - started
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert f"the {service} did not answer within {TIMEOUT_S:g}s (--rpc-timeout-s)" == message
    assert waited < TIMEOUT_S + 5, f"the error took {waited:.1f}s"


def _stall(fakes, service: str, on: bool) -> None:
    """Stop (or restart) one fake service without killing it."""
    if service == "scheduler":
        fakes.scheduler.outputs_stalled = on
    else:
        fakes.tokenizer.stalled = on


def _stall_mid_stream(client, fakes, service: str) -> None:
    """Stream a slow completion and stop `service` after the first event: the stream ends
    with a 503 error event naming it, then [DONE], within the timeout and a margin."""
    body = {"prompt": "hi #slow", "max_tokens": 100, "stream": True, "ignore_eos": True}
    events: list[str] = []
    try:
        with client.stream("POST", COMPL, json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        _stall(fakes, service, True)
                        started = time.monotonic()
    finally:
        _stall(fakes, service, False)
    assert time.monotonic() - started < TIMEOUT_S + 5
    assert events[-1] == "[DONE]"
    assert '"code": 503' in events[-2] and f"the {service} did not answer" in events[-2]


@pytest.mark.parametrize(
    "path,body",
    [
        (COMPL, {"prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/tokenize", {"prompt": "hi"}),
        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/detokenize", {"tokens": [104, 105]}),
    ],
)
def test_a_silent_tokenizer_service_gives_503(make_gateway, stalled_tokenizer, path, body):
    gw = make_gateway(rpc_timeout_s=TIMEOUT_S)
    with gw.client() as c:
        started = time.monotonic()
        _assert_stalled(c.post(path, json=body), "tokenizer service", started)


def test_the_request_timeout_stays_a_504(make_gateway, stalled_tokenizer):
    gw = make_gateway(rpc_timeout_s=30, request_timeout_s=TIMEOUT_S)
    with gw.client() as c:
        r = c.post(COMPL, json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 504, r.text


def test_a_silent_output_stream_fails_its_requests(make_gateway, fakes):
    gw = make_gateway(rpc_timeout_s=TIMEOUT_S)
    body = {"prompt": "hi", "max_tokens": 2}
    with gw.client() as c:
        assert c.post(COMPL, json=body).status_code == 200  # the stream is open
        time.sleep(3 * TIMEOUT_S)  # idle, yet heartbeats keep it alive
        assert c.get("/health").status_code == 200
        assert c.post(COMPL, json=body).status_code == 200
        fakes.scheduler.outputs_stalled = True
        try:
            started = time.monotonic()
            _assert_stalled(c.post(COMPL, json=body), "scheduler", started)
            r = c.get("/health")
            assert r.status_code == 503 and "scheduler" in r.json()["error"]["message"]
            started = time.monotonic()  # a new stream meets the same silence
            _assert_stalled(c.post(COMPL, json={**body, "stream": True}), "scheduler", started)
        finally:
            fakes.scheduler.outputs_stalled = False
        # With no request to reopen it, the gateway does: /health recovers on its own.
        wait_until(lambda: c.get("/health").status_code == 200, what="/health back to 200")
        assert c.post(COMPL, json=body).status_code == 200


def test_a_stall_mid_stream_ends_it_with_an_error_event(make_gateway, fakes):
    with make_gateway(rpc_timeout_s=TIMEOUT_S).client() as c:
        _stall_mid_stream(c, fakes, "scheduler")


# ---------------------------------------------------------------- per-sequence path
# A tokenizer the service cannot ship: each sequence runs its own scheduler Generate call and
# DetokenizeStream; both are bounded the same way, with heartbeats on Generate.


@pytest.fixture
def per_sequence(make_gateway, fakes):
    fakes.tokenizer.ship_decoder = False
    try:
        gw = make_gateway(rpc_timeout_s=TIMEOUT_S)
    finally:
        fakes.tokenizer.ship_decoder = True
    with gw.client() as c:
        yield c


def test_per_sequence_a_quiet_request_outlives_the_timeout(per_sequence, fakes, loop_thread):
    """Queued or slow is not stalled: heartbeats keep a Generate call that has no tokens yet
    alive past --rpc-timeout-s."""
    loop_thread.loop.call_soon_threadsafe(fakes.scheduler.gate.clear)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = {"prompt": "#gate quiet", "max_tokens": 3}
            future = pool.submit(per_sequence.post, COMPL, json=body)
            time.sleep(4 * TIMEOUT_S)
            loop_thread.loop.call_soon_threadsafe(fakes.scheduler.gate.set)
            r = future.result(30)
    finally:
        loop_thread.loop.call_soon_threadsafe(fakes.scheduler.gate.set)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_per_sequence_a_silent_scheduler_gives_503(per_sequence, stalled_outputs):
    started = time.monotonic()
    _assert_stalled(
        per_sequence.post(COMPL, json={"prompt": "hi", "max_tokens": 2}), "scheduler", started
    )


def test_per_sequence_a_stall_mid_stream_ends_it_with_an_error_event(per_sequence, fakes):
    _stall_mid_stream(per_sequence, fakes, "scheduler")


def test_per_sequence_a_silent_detokenizer_gives_503(per_sequence, fakes):
    """The tokenizer service stops after the prompt was prepared: the detokenize stream's
    silence is bounded too."""
    _stall_mid_stream(per_sequence, fakes, "tokenizer service")


def test_embeddings_a_silent_scheduler_gives_503(make_gateway, fakes):
    fakes.scheduler.runner_info = common_pb2.RunnerInfo(
        runner="pooling", pooling_type="LAST", normalize=True, hidden_size=8
    )
    try:
        gw = make_gateway(rpc_timeout_s=TIMEOUT_S)
    finally:
        fakes.scheduler.runner_info = None
    with gw.client() as c:
        assert c.post("/v1/embeddings", json={"input": "hi"}).status_code == 200
        fakes.scheduler.outputs_stalled = True
        try:
            started = time.monotonic()
            _assert_stalled(c.post("/v1/embeddings", json={"input": "hi"}), "scheduler", started)
        finally:
            fakes.scheduler.outputs_stalled = False
