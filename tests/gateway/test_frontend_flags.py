"""vLLM's frontend flags on the gateway: request logging, docs, response role, request-id
headers, /load, uvicorn's access log and TLS."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import subprocess

import httpx
import pytest
import uvicorn

from splitserve.entrypoints import launcher
from splitserve.gateway.app import build_app
from splitserve.gateway.config import GatewayConfig
from splitserve.gateway.server import uvicorn_config

from .conftest import _no_signals, wait_until
from .fakes import encode
from .test_completions import sse_events, tag

CHAT = "/v1/chat/completions"


def _complete(gw, prompt: str, **body) -> httpx.Response:
    with gw.client() as c:
        return c.post("/v1/completions", json={"model": "fake-model", "prompt": prompt, **body})


def _request_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "splitserve.gateway.requests"]


def test_request_logging_off_by_default(gateway, caplog):
    caplog.set_level(logging.INFO, logger="splitserve.gateway.requests")
    r = _complete(gateway, f"quiet {tag()}", max_tokens=2)
    assert r.status_code == 200
    assert _request_logs(caplog) == []


def test_enable_log_requests_logs_prompt_cut_to_max_log_len(make_gateway, caplog):
    caplog.set_level(logging.INFO, logger="splitserve.gateway.requests")
    gw = make_gateway(enable_log_requests=True, max_log_len=6)
    prompt = f"abcdefghij {tag()}"
    r = _complete(gw, prompt, max_tokens=2, temperature=0.5)
    assert r.status_code == 200
    (line,) = _request_logs(caplog)
    assert line.startswith("Received request cmpl-")
    assert "prompt: 'abcdef'," in line
    assert f"prompt_token_ids: {encode('abcde', add_bos=True)}" in line
    assert "temperature=0.5" in line
    # Chat logs the rendered prompt under the chat request id.
    with gw.client() as c:
        r = c.post(
            CHAT,
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert r.status_code == 200
    chat_line = _request_logs(caplog)[-1]
    assert chat_line.startswith("Received request chatcmpl-")
    assert "prompt: '<|user'," in chat_line


def test_log_request_flags_contradict():
    with pytest.raises(ValueError, match="--enable-log-requests and --disable-log-requests"):
        GatewayConfig(enable_log_requests=True, disable_log_requests=True)
    assert not GatewayConfig(disable_log_requests=True).enable_log_requests


def test_disable_fastapi_docs(gateway, make_gateway):
    with gateway.client() as c:
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code == 200
    gw = make_gateway(disable_fastapi_docs=True)
    with gw.client() as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 404, path
        assert c.get("/health").status_code == 200


def test_response_role(make_gateway):
    gw = make_gateway(response_role="bot")
    msgs = [{"role": "user", "content": "hi"}]
    with gw.client() as c:
        r = c.post(CHAT, json={"model": "fake-model", "messages": msgs, "max_tokens": 3})
        assert r.json()["choices"][0]["message"]["role"] == "bot"
        # Without a generation prompt the reply continues the last message's turn (vLLM).
        cont = [*msgs, {"role": "critic", "content": "so"}]
        r = c.post(
            CHAT,
            json={
                "model": "fake-model",
                "messages": cont,
                "max_tokens": 3,
                "add_generation_prompt": False,
            },
        )
        assert r.json()["choices"][0]["message"]["role"] == "critic"
        r = c.post(
            CHAT, json={"model": "fake-model", "messages": msgs, "max_tokens": 3, "stream": True}
        )
        first = sse_events(r.text)[0]
        assert first["choices"][0]["delta"]["role"] == "bot"


def test_request_id_headers(gateway, make_gateway):
    with gateway.client() as c:
        assert "x-request-id" not in c.get("/v1/models").headers
    gw = make_gateway(enable_request_id_headers=True)
    with gw.client() as c:
        r = c.get("/v1/models", headers={"X-Request-Id": "trace-42"})
        assert r.headers["x-request-id"] == "trace-42"
        generated = c.get("/v1/models").headers["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0
        assert c.get("/v1/models").headers["x-request-id"] != generated
        # Errors carry it too; an unusable incoming id is replaced.
        r = c.get("/nope", headers={"X-Request-Id": "a b"})
        assert r.status_code == 404 and r.headers["x-request-id"] not in ("a b", "")


def test_server_load_tracking(gateway, make_gateway, fakes):
    with gateway.client() as c:
        assert c.get("/load").status_code == 404  # not served without the flag
    gw = make_gateway(enable_server_load_tracking=True)
    with gw.client() as c, gw.client() as poll:
        assert poll.get("/load").json() == {"server_load": 0}
        t = tag()
        body = {"model": "fake-model", "prompt": f"#hold@2 {t}", "max_tokens": 50, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            wait_until(lambda: poll.get("/load").json()["server_load"] == 1, what="load 1")
            # Other routes do not count.
            poll.get("/v1/models")
            assert poll.get("/load").json() == {"server_load": 1}
        wait_until(lambda: poll.get("/load").json()["server_load"] == 0, what="load back to 0")


def test_uvicorn_access_log_flag():
    app = object()
    assert uvicorn_config(app, GatewayConfig()).access_log is True
    assert uvicorn_config(app, GatewayConfig(disable_uvicorn_access_log=True)).access_log is False


def test_ssl_flags_checked(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        GatewayConfig(ssl_keyfile=str(tmp_path / "k.pem"))
    with pytest.raises(ValueError, match="not a readable file"):
        GatewayConfig(ssl_keyfile=str(tmp_path / "k.pem"), ssl_certfile=str(tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="needs TLS"):
        GatewayConfig(ssl_cert_reqs=1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_serving(tmp_path, loop_thread, fakes):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    config = GatewayConfig(
        scheduler_address=fakes.scheduler_address,
        tokenizer_address=fakes.tokenizer_address,
        port=0,
        served_model_name=["fake-model"],
        startup_timeout_s=10,
        uvicorn_log_level="warning",
        ssl_keyfile=str(key),
        ssl_certfile=str(cert),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(build_app(config), config))
    server.capture_signals = _no_signals

    async def serve():
        return asyncio.ensure_future(server.serve(sockets=[sock]))

    task = loop_thread.run(serve())
    try:
        wait_until(lambda: server.started or task.done(), what="TLS gateway start")
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=str(cert)),
        ) as c:
            assert c.get("/health").status_code == 200
            r = c.post(
                "/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 2}
            )
            assert r.status_code == 200
        # `splitserve serve` sees the TLS gateway come up.
        assert launcher._healthy(f"https://127.0.0.1:{port}/health")
        assert launcher._accepts_connections("127.0.0.1", port)
        # Plain HTTP on the TLS port does not get an answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        server.should_exit = True
        loop_thread.run(asyncio.wait_for(asyncio.shield(task), 10))
