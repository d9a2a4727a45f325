"""One tokenizer-service call per request, counted on the wire: a second gateway talks to the
stack's real tokenizer service through a counting gRPC proxy in this process. Chat and
completions with bad words and a JSON-schema constraint cost exactly one `Prepare` call each,
streamed or not; a bad constraint is still a 400 with the service's message, after that one
call. (The scheduler has no tokenizer address at all: tests/scheduler/test_grammar.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import httpx
import pytest

from splitserve.entrypoints.launcher import free_port

from .conftest import wait_for

SERVICE = "/splitserve.tokenizer.v1.TokenizerService/"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}},
    "required": ["city"],
    "additionalProperties": False,
}


class CountingProxy(grpc.GenericRpcHandler):
    """Forwards unary calls (bytes in, bytes out) to `target`, recording the method name of
    every TokenizerService call; errors come back with their status and trailing metadata."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def service(self, handler_call_details):
        method = handler_call_details.method

        def forward(request: bytes, context):
            if method.startswith(SERVICE):
                with self.lock:
                    self.calls.append(method[len(SERVICE) :])
            metadata = [
                (k, v)
                for k, v in context.invocation_metadata()
                if not k.startswith((":", "grpc-")) and k != "user-agent"
            ]
            remaining = context.time_remaining()  # about 2**63 ns without a deadline
            try:
                return self.channel.unary_unary(method)(
                    request, metadata=metadata, timeout=remaining if remaining < 3600 else None
                )
            except grpc.RpcError as exc:
                context.set_trailing_metadata(exc.trailing_metadata() or ())
                context.abort(exc.code(), exc.details())

        return grpc.unary_unary_rpc_method_handler(forward)

    def since(self, n: int) -> list[str]:
        with self.lock:
            return self.calls[n:]


@pytest.fixture(scope="module")
def counted(server, tmp_path_factory):
    """(gateway url, proxy): a gateway whose tokenizer-service calls go through the proxy."""
    proxy = CountingProxy(server.tokenizer_address)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[proxy])
    proxy_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("prepare") / "gateway.log").open("w")
    gw = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitserve.entrypoints.cli",
            "gateway",
            "--port",
            str(port),
            "--model",
            server.model,
            "--scheduler-address",
            server.scheduler_address,
            "--tokenizer-address",
            f"127.0.0.1:{proxy_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 90, "the counted gateway", gw)
        yield url, proxy
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(30)
        grpc_server.stop(0)
        proxy.channel.close()


def _post(url: str, path: str, body: dict) -> httpx.Response:
    r = httpx.post(url + path, json=body, timeout=120)
    if body.get("stream"):
        assert r.status_code == 200, r.text
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events[:-1])
    return r


@pytest.mark.parametrize("stream", [False, True])
def test_chat_costs_one_prepare_call(server, counted, stream):
    url, proxy = counted
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Where to?"}],
        "bad_words": ["the", "a"],
        "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        "max_tokens": 40,
        "stream": stream,
    }
    n = len(proxy.calls)
    r = _post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert proxy.since(n) == ["Prepare"]
    if not stream:
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":  # the grammar ended: the output is the schema's
            assert set(json.loads(choice["message"]["content"])) == {"city"}


@pytest.mark.parametrize("stream", [False, True])
def test_completions_cost_one_prepare_call(server, counted, stream):
    url, proxy = counted
    body = {
        "model": server.model,
        "prompt": ["Once upon", [10, 11, 12]],  # a batch: text and token ids, echoed
        "echo": True,
        "bad_words": ["time"],
        "guided_json": SCHEMA,
        "max_tokens": 40,
        "stream": stream,
    }
    n = len(proxy.calls)
    r = _post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert proxy.since(n) == ["Prepare"]
    if not stream:
        texts = [c["text"] for c in r.json()["choices"]]
        assert texts[0].startswith("Once upon") and len(texts) == 2


def test_a_bad_constraint_is_400_after_one_call(server, counted):
    url, proxy = counted
    n = len(proxy.calls)
    r = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": server.model,
            "messages": [{"role": "user", "content": "hi"}],
            "guided_json": {"type": "object", "not": {"required": ["a"]}},
            "guided_decoding_backend": "xgrammar",
        },
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "guided_json"
    assert err["message"].startswith("invalid guided_json: backend xgrammar does not enforce")
    assert proxy.since(n) == ["Prepare"]
