"""SSEResponse's body chunks skip the middlewares (DirectBodyMiddleware) while the start and
the end of the response still pass every one of them."""

from __future__ import annotations

import asyncio

import pytest
from starlette.middleware.cors import CORSMiddleware

from splitserve.gateway.app import build_app
from splitserve.gateway.config import GatewayConfig
from splitserve.gateway.metrics import HTTPMetricsMiddleware
from splitserve.gateway.middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    DrainMiddleware,
    RequestIdMiddleware,
)
from splitserve.gateway.streaming import (
    DIRECT_SEND,
    DirectBodyMiddleware,
    SSEResponse,
    TextChunkTemplate,
    sse,
)

from .test_completions import sse_events, tag


def test_every_middleware_under_the_direct_send_looks_at_the_start_message_only():
    # NOTE: a middleware that changes or counts body messages (compression, say) added inside
    # DirectBodyMiddleware would miss the streamed chunks: this list must be checked first.
    app = build_app(GatewayConfig(api_key="k", enable_request_id_headers=True))
    assert [m.cls for m in app.user_middleware] == [
        DirectBodyMiddleware,
        CORSMiddleware,
        RequestIdMiddleware,
        HTTPMetricsMiddleware,
        DrainMiddleware,
        BodyLimitMiddleware,
        APIKeyMiddleware,
    ]


def test_sse_response_sends_chunks_direct_and_start_and_end_down_the_chain():
    chain: list[dict] = []
    direct: list[dict] = []
    closed: list[bool] = []

    async def body():
        yield "data: 1\n\n"
        yield "data: [DONE]\n\n"

    async def on_close() -> None:
        closed.append(True)

    async def to_chain(message):
        chain.append(message)

    async def to_direct(message):
        direct.append(message)

    async def never_disconnects():
        await asyncio.Event().wait()

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, DIRECT_SEND: to_direct}
    asyncio.run(SSEResponse(body(), on_close)(scope, never_disconnects, to_chain))
    assert [m["type"] for m in chain] == ["http.response.start", "http.response.body"]
    assert chain[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in chain[0]["headers"]
    assert chain[1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert [m["body"] for m in direct] == [b"data: 1\n\n", b"data: [DONE]\n\n"]
    assert all(m["more_body"] for m in direct)
    assert closed == [True]


def test_streamed_response_keeps_cors_request_id_and_metrics(make_gateway):
    gw = make_gateway(allowed_origins=["https://app.example"], enable_request_id_headers=True)
    with gw.client() as c:
        r = c.post(
            "/v1/completions",
            json={
                "model": "fake-model",
                "prompt": f"cors {tag()}",
                "max_tokens": 3,
                "stream": True,
            },
            headers={"Origin": "https://app.example", "X-Request-Id": "req-42"},
        )
        metrics = c.get("/metrics").text
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["x-request-id"] == "req-42"
    events = sse_events(r.text)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    line = 'splitserve_http_requests_total{endpoint="/v1/completions",status="200"} 1.0'
    assert line in metrics
    assert gw.app.state.gateway.in_flight == 0


@pytest.mark.parametrize("usage_null", [False, True])
@pytest.mark.parametrize(
    "text, finish_reason, stop_reason",
    [
        ("hello", None, None),
        ("", "length", None),
        ('quo"te \\ back\nslash\t\x00\x1f', "stop", "</s>"),
        ("héllo 世界 \U0001f600 \u2028", "stop", 7),
        ("x", "abort", 0),
    ],
)
def test_text_chunk_template_renders_the_bytes_sse_does(
    usage_null, text, finish_reason, stop_reason
):
    ids = ("cmpl-1", 'odd "id" \u00e9', 1733500000)
    template = TextChunkTemplate(ids[0], "text_completion", ids[2], ids[1], usage_null)
    chunk = {
        "id": ids[0],
        "object": "text_completion",
        "created": ids[2],
        "model": ids[1],
        "choices": [
            {
                "index": 3,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
    }
    if usage_null:
        chunk["usage"] = None
    assert template.render(3, text, finish_reason, stop_reason) == sse(chunk)
