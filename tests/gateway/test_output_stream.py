"""The gateway's batched output path: one scheduler stream for every sequence, detokenized in
the gateway (no tokenizer-service call per token)."""

from __future__ import annotations

import json

from .conftest import wait_until
from .fakes import SCRIPT
from .test_completions import tag
from .test_faults import COMPL


def _events(lines) -> list[dict]:
    return [json.loads(x[5:]) for x in lines if x.startswith("data:") and x != "data: [DONE]"]


def test_sequences_run_on_the_output_stream_without_tokenizer_calls(gateway, fakes):
    t = tag()
    opened = fakes.scheduler.streams_opened
    submit_opened = fakes.scheduler.submit_streams_opened
    unary_submits = fakes.scheduler.unary_submits
    detok_streams = fakes.tokenizer.streams_opened
    body = {
        "prompt": f"{t}",
        "max_tokens": 30,
        "n": 3,
        "stream": True,
        "stop": ["lazy"],
        "logprobs": 2,
    }
    with gateway.client() as c, c.stream("POST", COMPL, json=body) as r:
        assert r.status_code == 200
        events = _events(r.iter_lines())
    texts = ["", "", ""]
    for e in events:
        for ch in e["choices"]:
            texts[ch["index"]] += ch["text"]
    assert texts == [SCRIPT[:30]] * 3  # "lazy" lies past 30 tokens
    calls = fakes.scheduler.calls_matching(t)
    assert len(calls) == 3 and all(c.submitted for c in calls)
    # NOTE: what this path exists for: the tokenizer service sees no call for these tokens,
    # and the scheduler stream is the gateway's one (opened once, reused).
    assert fakes.tokenizer.streams_opened == detok_streams
    assert fakes.scheduler.streams_opened <= max(opened, 1)
    # The sequences went as messages on the stream's one SubmitStream call, not a call each.
    assert fakes.scheduler.submit_streams_opened <= max(submit_opened, 1)
    assert fakes.scheduler.unary_submits == unary_submits


def test_stop_string_aborts_the_sequence_in_the_scheduler(http, fakes):
    t = tag()
    r = http.post(COMPL, json={"prompt": f"#hold@40 {t}", "max_tokens": 60, "stop": ["brown"]})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["text"] == "The quick " and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "brown"
    assert fakes.scheduler.waiter.wait_for(
        lambda: all(c.cancelled for c in fakes.scheduler.calls_matching(t))
    )


def _break_a_running_stream(gateway, brk) -> None:
    """A streamed request is running when `brk()` breaks the scheduler side: the request ends
    with a 503 error event and [DONE], and the next request is answered."""
    t = tag()
    body = {"prompt": f"#hold@3 {t}", "max_tokens": 50, "stream": True}
    with gateway.client() as c, c.stream("POST", COMPL, json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"]
        brk()
        rest = list(lines)
    errors = [e for e in _events(rest) if "error" in e]
    assert errors and errors[0]["error"]["code"] == 503
    assert "data: [DONE]" in rest
    r = gateway.client().post(COMPL, json={"prompt": f"again {t}", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == SCRIPT[:5]


def test_a_broken_stream_fails_its_requests_and_the_next_request_reopens(
    gateway, fakes, loop_thread
):
    opened = fakes.scheduler.streams_opened

    async def brk() -> None:
        fakes.scheduler.break_streams()

    _break_a_running_stream(gateway, lambda: loop_thread.run(brk()))
    wait_until(lambda: fakes.scheduler.streams_opened == opened + 1, what="a new stream")


def test_a_broken_submission_call_fails_the_stream_and_the_next_request_reopens(gateway, fakes):
    submit_opened = fakes.scheduler.submit_streams_opened
    broken = []

    def brk() -> None:
        # Token 0 makes the fake end the SubmitStream call (UNAVAILABLE) when it reads it.
        broken.append(gateway.client().post(COMPL, json={"prompt": [0, 65, 66], "max_tokens": 3}))

    _break_a_running_stream(gateway, brk)
    assert broken[0].status_code == 503
    assert fakes.scheduler.submit_streams_opened == submit_opened + 1


def test_the_scheduler_channel_pushes_back_on_a_slow_gateway():
    """The output stream's backpressure (gateway/clients.py, SCHEDULER_CHANNEL_OPTIONS): a
    small fixed HTTP/2 window, no BDP growth, on the scheduler channel only, so that a
    gateway behind the engine gets fewer, merged OutputBatch messages (the throughput effect
    is measured by bench/stack_overhead.py, not here)."""
    from splitserve.gateway.clients import _CHANNEL_OPTIONS, SCHEDULER_CHANNEL_OPTIONS

    options = dict(SCHEDULER_CHANNEL_OPTIONS)
    assert options["grpc.http2.bdp_probe"] == 0
    assert options["grpc.http2.lookahead_bytes"] <= 64 * 1024
    assert "grpc.http2.bdp_probe" not in dict(_CHANNEL_OPTIONS)  # the tokenizer channel
