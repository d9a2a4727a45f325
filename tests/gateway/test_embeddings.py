"""POST /v1/embeddings against the fakes: input shapes, base64, dimensions (matryoshka only),
usage, and the 400s (CHECKLIST rows 2, 3, 5), on a gateway whose scheduler reports the
pooling runner; a generate model refuses the endpoint."""

from __future__ import annotations

import base64
import json
import socket
import uuid

import numpy as np
import openai
import pytest

from splitserve.protos import common_pb2

from .conftest import start_gateway, stop_gateway
from .fakes import BOS, MAX_MODEL_LEN, TOKENIZER_VOCAB, encode, fake_embedding, token_text


def _pooling_gateway(loop_thread, fakes, **info):
    fakes.scheduler.runner_info = common_pb2.RunnerInfo(
        runner="pooling", pooling_type="LAST", normalize=True, hidden_size=8, **info
    )
    try:
        return start_gateway(loop_thread, fakes)
    finally:
        fakes.scheduler.runner_info = None  # read once, at the gateway's start-up


@pytest.fixture(scope="module")
def pooling(loop_thread, fakes):
    gw = _pooling_gateway(loop_thread, fakes)
    with gw.client() as client:
        yield client
    stop_gateway(loop_thread, gw)


@pytest.fixture(scope="module")
def matryoshka(loop_thread, fakes):
    gw = _pooling_gateway(loop_thread, fakes, is_matryoshka=True, matryoshka_dimensions=[4, 8])
    with gw.client() as client:
        yield client
    stop_gateway(loop_thread, gw)


def _error(resp, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def test_input_shapes_and_usage(pooling):
    cases = [
        ("hello", [encode("hello", add_bos=True)]),
        (["ab", "xyz"], [encode("ab", add_bos=True), encode("xyz", add_bos=True)]),
        ([5, 6, 7], [[5, 6, 7]]),
        ([[1, 2], [3, 4, 5]], [[1, 2], [3, 4, 5]]),
    ]
    for body, ids in cases:
        resp = pooling.post("/v1/embeddings", json={"input": body, "user": "someone"})
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["object"] == "list" and out["model"] == "fake-model"
        assert [d["index"] for d in out["data"]] == list(range(len(ids)))
        assert [d["object"] for d in out["data"]] == ["embedding"] * len(ids)
        assert [d["embedding"] for d in out["data"]] == [fake_embedding(i) for i in ids]
        used = sum(map(len, ids))
        assert out["usage"] == {"prompt_tokens": used, "total_tokens": used}


def test_one_tokenizer_call_per_request(pooling, fakes):
    for body in (
        {"input": ["one", "two", [65, 66]]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ):
        before = len(fakes.tokenizer.rpcs)
        assert pooling.post("/v1/embeddings", json=body).status_code == 200
        assert fakes.tokenizer.rpcs[before:] == ["Prepare"]


def test_normalize_is_passed_on(pooling):
    resp = pooling.post("/v1/embeddings", json={"input": [3, 4], "normalize": True})
    vec = np.array(resp.json()["data"][0]["embedding"])
    assert np.allclose(
        vec, np.array(fake_embedding([3, 4])) / np.linalg.norm(fake_embedding([3, 4]))
    )


def _metric(client, name: str) -> float:
    text = client.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def test_metrics_count_embeddings(pooling):
    before = _metric(pooling, "vllm:prompt_tokens_total")
    done = _metric(pooling, 'vllm:request_success_total{finished_reason="stop"')
    assert pooling.post("/v1/embeddings", json={"input": [[1, 2, 3], [4, 5]]}).status_code == 200
    assert _metric(pooling, "vllm:prompt_tokens_total") == before + 5
    assert _metric(pooling, 'vllm:request_success_total{finished_reason="stop"') == done + 2


def test_base64_is_little_endian_float32(pooling):
    resp = pooling.post("/v1/embeddings", json={"input": [7, 8, 9], "encoding_format": "base64"})
    assert resp.status_code == 200, resp.text
    raw = base64.b64decode(resp.json()["data"][0]["embedding"])
    assert np.frombuffer(raw, dtype="<f4").tolist() == fake_embedding([7, 8, 9])


def test_openai_client(pooling):
    client = openai.OpenAI(base_url=str(pooling.base_url) + "/v1", api_key="x")
    # The client asks for base64 unless told otherwise, and decodes it.
    out = client.embeddings.create(model="alias", input=["hi", "there"])
    assert [d.embedding for d in out.data] == [
        fake_embedding(encode(t, add_bos=True)) for t in ("hi", "there")
    ]
    assert out.usage.prompt_tokens == 2 + 1 + 5 + 1


def test_truncate_and_special_tokens(pooling):
    long = list(range(1, 250)) * 2  # 498 tokens, over the 256-token context
    resp = pooling.post("/v1/embeddings", json={"input": long, "truncate_prompt_tokens": -1})
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"][0]["embedding"] == fake_embedding(long[-MAX_MODEL_LEN:])
    resp = pooling.post("/v1/embeddings", json={"input": long, "truncate_prompt_tokens": 3})
    assert resp.json()["data"][0]["embedding"] == fake_embedding(long[-3:])
    resp = pooling.post("/v1/embeddings", json={"input": "ab", "add_special_tokens": False})
    assert resp.json()["data"][0]["embedding"] == fake_embedding(encode("ab"))
    resp = pooling.post("/v1/embeddings", json={"messages": [{"role": "user", "content": "q"}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"][0]["embedding"] == fake_embedding(encode("<|user|>q\n"))


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"input": ""}, "input", "empty"),
        ({"input": []}, "input", "empty"),
        ({"input": [[1, 2], []]}, "input", "empty"),
        ({}, "input", "exactly one of input and messages"),
        ({"input": [1, 260]}, "input", "outside the vocabulary"),
        ({"input": [-1]}, "input", "outside the vocabulary"),
        ({"input": [1] * (MAX_MODEL_LEN + 1)}, "input", f"{MAX_MODEL_LEN} tokens"),
        ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "got 0"),
        ({"input": [[1]] * 2049}, "input", "at most 2048 inputs, got 2049"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", ""),
        ({"input": "x", "dimensions": 4}, "dimensions", "does not support matryoshka"),
        ({"input": "x", "model": "nope"}, "model", "does not exist"),
    ],
)
def test_bad_requests(pooling, body, param, needle):
    status = 404 if param == "model" else 400
    error = _error(pooling.post("/v1/embeddings", json=body), status)
    assert error["param"] == param
    assert needle in error["message"]
    if "tokens" in needle:
        assert str(MAX_MODEL_LEN + 1) in error["message"]


def test_dimensions_on_a_matryoshka_model(matryoshka):
    resp = matryoshka.post("/v1/embeddings", json={"input": [3, 4], "dimensions": 4})
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"][0]["embedding"] == fake_embedding([3, 4])[:4]
    for bad in (5, 0):
        error = _error(matryoshka.post("/v1/embeddings", json={"input": [3], "dimensions": bad}))
        assert error["param"] == "dimensions"


def test_disconnect_cancels_the_scheduler_calls(loop_thread, fakes):
    """CHECKLIST row 17: a client gone while its inputs are queued aborts them downstream."""
    gw = _pooling_gateway(loop_thread, fakes)
    try:
        t = f"#hang {uuid.uuid4().hex[:8]}"
        body = json.dumps({"input": ["fine", t]}).encode()
        host, port = gw.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            assert fakes.scheduler.waiter.wait_for(lambda: fakes.scheduler.calls_matching(t))
        calls = fakes.scheduler.calls_matching(t)
        assert fakes.scheduler.waiter.wait_for(lambda: calls[0].cancelled)
    finally:
        stop_gateway(loop_thread, gw)


def test_queue_full_is_503(pooling):
    resp = pooling.post("/v1/embeddings", json={"input": "#busy"})
    _error(resp, 503)
    assert resp.headers["retry-after"] == "1"


def test_lora_adapter_is_passed_on(loop_thread, fakes, tmp_path):
    """model= an adapter's name: the scheduler request carries the adapter, the response
    names it (as vLLM)."""
    folder = tmp_path / "emb"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"})
    )
    (folder / "adapter_model.safetensors").write_bytes(b"")
    fakes.scheduler.runner_info = common_pb2.RunnerInfo(runner="pooling", hidden_size=8)
    try:
        gw = start_gateway(loop_thread, fakes, enable_lora=True, lora_modules=[f"emb={folder}"])
    finally:
        fakes.scheduler.runner_info = None
    try:
        with gw.client() as c:
            resp = c.post("/v1/embeddings", json={"input": [5, 6, 71], "model": "emb"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == "emb"
        (call,) = [
            c
            for c in fakes.scheduler.calls.values()
            if list(c.request.prompt_token_ids) == [5, 6, 71]
        ]
        # The name alone: the scheduler resolves it (the gateway loaded it there at start).
        assert call.request.pooling and call.request.lora_name == "emb"
        assert call.request.lora_path == "" and call.request.lora_int_id == 0
        assert fakes.scheduler.adapters.get("emb").path == str(folder.resolve())
    finally:
        stop_gateway(loop_thread, gw)


def test_generate_model_refuses_embeddings(http):
    error = _error(http.post("/v1/embeddings", json={"input": "hi"}))
    assert "does not support Embeddings API" in error["message"]
    assert "--runner generate" in error["message"]


def test_bos_is_counted(pooling):
    resp = pooling.post("/v1/embeddings", json={"input": "a"})
    assert resp.json()["usage"]["prompt_tokens"] == len([BOS, ord("a")])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_embeddings_schema_fuzz(fakes, mode):
    """CHECKLIST row 26 for /v1/embeddings with the pooling runner behind it (the suite-wide
    fuzz test sees a generate model, which refuses the route before reading the input)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    from splitserve.gateway.app import build_app
    from splitserve.gateway.config import GatewayConfig

    from .test_openapi_fuzz import CHECKS, EXAMPLES

    fakes.scheduler.runner_info = common_pb2.RunnerInfo(
        runner="pooling", pooling_type="LAST", normalize=True, hidden_size=8
    )
    try:
        app = build_app(
            GatewayConfig(
                scheduler_address=fakes.scheduler_address,
                tokenizer_address=fakes.tokenizer_address,
                served_model_name=["fake-model"],
                startup_timeout_s=10,
                request_timeout_s=10,
            )
        )
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        (op,) = [r.ok() for r in schema.get_all_operations() if r.ok().path == "/v1/embeddings"]

        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            statuses.append(case.call_and_validate(checks=CHECKS).status_code)

        statuses: list[int] = []
        run()
        assert statuses and all(status < 500 for status in statuses)
        # Random bodies rarely pass every check; one valid body surely reaches the pooling
        # path, and its response is validated against the schema too.
        valid = op.Case(
            body={"model": "fake-model", "input": ["a", [5, 6]]}, media_type="application/json"
        )
        assert valid.call_and_validate(checks=CHECKS).status_code == 200
    finally:
        fakes.scheduler.runner_info = None


def test_an_input_past_any_prompt_that_fits_is_refused_before_tokenizing(pooling, fakes):
    limit = MAX_MODEL_LEN * max(len(token_text(t)) for t in range(TOKENIZER_VOCAB))
    calls = len(fakes.tokenizer.rpcs)
    resp = pooling.post("/v1/embeddings", json={"input": ["ok", "x" * (limit + 1)]})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "input" and "input 1 holds" in error["message"], error
    assert len(fakes.tokenizer.rpcs) == calls
    # Truncation asked for: longer inputs are the point (only the body limit bounds them).
    resp = pooling.post(
        "/v1/embeddings", json={"input": "x" * (limit + 1), "truncate_prompt_tokens": 3}
    )
    assert resp.status_code == 200, resp.text
