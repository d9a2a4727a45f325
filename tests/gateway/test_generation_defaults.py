"""The model's default sampling parameters (generation_config.json, reported in ModelInfo) fill
the fields a request leaves unset, on both endpoints, streaming or not; explicit values win."""

from __future__ import annotations

import logging

import pytest

from splitserve.common.generation_config import SamplingDefaults
from splitserve.gateway.clients import ServiceClients

from .conftest import start_gateway, stop_gateway
from .fakes import MAX_MODEL_LEN

DEFAULTS = SamplingDefaults(
    temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, min_p=0.05, max_tokens=5
)


@pytest.fixture(scope="module")
def gen_gateway(loop_thread, fakes):
    fakes.scheduler.sampling_defaults = DEFAULTS.to_proto()
    try:
        gw = start_gateway(loop_thread, fakes)  # reads ModelInfo during start-up
    finally:
        fakes.scheduler.sampling_defaults = None
    yield gw
    stop_gateway(loop_thread, gw)


@pytest.fixture(scope="module")
def gen_http(gen_gateway):
    with gen_gateway.client() as client:
        yield client


def _sampling(fakes, tag: str):
    (call,) = fakes.scheduler.calls_matching(tag)
    return call.request.sampling_params


def _assert_defaults(sp, max_tokens: int = 5) -> None:
    assert sp.temperature == pytest.approx(0.7)
    assert sp.top_p == pytest.approx(0.8)
    assert sp.top_k == 20
    assert sp.min_p == pytest.approx(0.05)
    assert sp.repetition_penalty == pytest.approx(1.05)
    assert sp.max_tokens == max_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_completions_without_the_fields_get_the_defaults(gen_http, fakes, stream):
    tag = f"gen-cmpl-{stream}"
    r = gen_http.post("/v1/completions", json={"prompt": tag, "stream": stream})
    assert r.status_code == 200, r.text
    _assert_defaults(_sampling(fakes, tag))
    if not stream:
        assert r.json()["usage"]["completion_tokens"] == 5  # max_new_tokens, not 16


@pytest.mark.parametrize("stream", [False, True])
def test_chat_without_the_fields_gets_the_defaults(gen_http, fakes, stream):
    tag = f"gen-chat-{stream}"
    body = {"messages": [{"role": "user", "content": tag}], "stream": stream}
    r = gen_http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    _assert_defaults(_sampling(fakes, tag))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_explicit_values_win_even_zero_and_minus_one(gen_http, fakes, path):
    tag = f"gen-explicit-{path}"
    explicit = {
        "temperature": 0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0,
        "repetition_penalty": 1.0,
        "max_tokens": 9,
    }
    prompt = (
        {"prompt": tag} if "chat" not in path else {"messages": [{"role": "user", "content": tag}]}
    )
    r = gen_http.post(path, json={**prompt, **explicit})
    assert r.status_code == 200, r.text
    sp = _sampling(fakes, tag)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.repetition_penalty) == (0, 1, 0, 0, 1)
    # max_tokens is the exception: as in vLLM the model's max_new_tokens (5) caps it.
    assert sp.max_tokens == 5


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_max_tokens_below_the_cap_is_kept(gen_http, fakes, path):
    tag = f"gen-below-{path}"
    prompt = (
        {"prompt": tag} if "chat" not in path else {"messages": [{"role": "user", "content": tag}]}
    )
    assert gen_http.post(path, json={**prompt, "max_tokens": 3}).status_code == 200
    assert _sampling(fakes, tag).max_tokens == 3


def test_a_large_max_new_tokens_leaves_completions_at_16_and_bounds_chat(make_gateway, fakes):
    """vLLM takes the least of the request's (completions: 16 when unset), the context's and
    the model's max_new_tokens."""
    fakes.scheduler.sampling_defaults = SamplingDefaults(max_tokens=40).to_proto()
    try:
        gw = make_gateway()
    finally:
        fakes.scheduler.sampling_defaults = None
    with gw.client() as c:
        assert c.post("/v1/completions", json={"prompt": "gen-big-cmpl"}).status_code == 200
        body = {"messages": [{"role": "user", "content": "gen-big-chat"}]}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        r = c.post(
            "/v1/completions", json={"prompt": "gen-big-x", "min_tokens": 2, "max_tokens": 50}
        )
        assert r.status_code == 200, r.text
        r = c.post(
            "/v1/completions", json={"prompt": "gen-big-m", "min_tokens": 45, "max_tokens": 50}
        )
    assert _sampling(fakes, "gen-big-cmpl").max_tokens == 16
    assert _sampling(fakes, "gen-big-chat").max_tokens == 40
    assert _sampling(fakes, "gen-big-x").max_tokens == 40
    assert r.status_code == 400
    assert "max_new_tokens, which caps every request" in r.json()["error"]["message"]


def test_default_max_tokens_is_capped_by_the_context(gen_http, fakes):
    # A prompt that leaves 3 tokens of context: the default 5 becomes 3, not a 400.
    ids = [ord("q")] * (MAX_MODEL_LEN - 3)
    r = gen_http.post("/v1/completions", json={"prompt": ids})
    assert r.status_code == 200, r.text
    (call,) = [c for c in fakes.scheduler.calls.values() if list(c.request.prompt_token_ids) == ids]
    assert call.request.sampling_params.max_tokens == 3


def test_a_gateway_without_defaults_keeps_its_own(http, fakes):
    r = http.post("/v1/completions", json={"prompt": "gen-none"})
    assert r.status_code == 200, r.text
    sp = _sampling(fakes, "gen-none")
    assert (sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty, sp.max_tokens) == (
        1,
        1,
        0,
        1,
        16,
    )


def _start_clients(loop_thread, fakes, defaults):
    fakes.scheduler.sampling_defaults = defaults.to_proto() if defaults else None
    clients = ServiceClients(fakes.scheduler_address, fakes.tokenizer_address)
    try:
        loop_thread.run(clients.start(5))
        return clients
    finally:
        fakes.scheduler.sampling_defaults = None
        loop_thread.run(clients.close())


def test_start_up_warns_once_naming_the_changed_defaults(loop_thread, fakes, caplog):
    with caplog.at_level(logging.WARNING, logger="splitserve.common.generation_config"):
        _start_clients(loop_thread, fakes, SamplingDefaults(temperature=0.7, top_p=1.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "temperature=0.7" in warnings[0] and "top_p" not in warnings[0]
    assert "--generation-config vllm" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="splitserve.common.generation_config"):
        _start_clients(loop_thread, fakes, None)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_bad_reported_defaults_fail_start_up_not_requests(loop_thread, fakes):
    # (The worker refuses such a file first; this guards the public scheduler API.)
    bad = DEFAULTS.to_proto()
    bad.top_p = 1.5
    fakes.scheduler.sampling_defaults = bad
    clients = ServiceClients(fakes.scheduler_address, fakes.tokenizer_address)
    try:
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
            loop_thread.run(clients.start(5))
    finally:
        fakes.scheduler.sampling_defaults = None
        loop_thread.run(clients.close())


def test_min_tokens_above_a_defaulted_max_tokens_says_where_it_came_from(gen_http):
    r = gen_http.post("/v1/completions", json={"prompt": "gen-min", "min_tokens": 8})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "min_tokens"
    assert "max_tokens (5) (the default, as the request gives no max_tokens)" in err["message"]
