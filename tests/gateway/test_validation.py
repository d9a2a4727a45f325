"""Bad input at the gateway (CHECKLIST rows 1-8, 10, 14, 15, 16): exact status, OpenAI error
body, `param` naming the field; the server stays healthy for the next request."""

from __future__ import annotations

import json
import socket

import pytest

from .fakes import MAX_MODEL_LEN, MODEL_VOCAB, TOKENIZER_VOCAB, token_text

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


def assert_error(resp, status: int, param: str | None = "__any__", code=None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "__any__":
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code
    return err


@pytest.fixture(autouse=True)
def still_healthy(http):
    """After every bad request the next good one still works."""
    yield
    r = http.post(COMPL, json={"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- row 1


@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_malformed_json(http, path):
    r = http.post(path, content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    err = assert_error(r, 400, None)
    assert "JSON" in err["message"]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null", b""])
def test_body_not_an_object(http, body):
    r = http.post(COMPL, content=body, headers={"content-type": "application/json"})
    assert_error(r, 400, None)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type(http, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = http.post(COMPL, content=b'{"prompt": "x"}', headers=headers)
    assert_error(r, 400, None)


# ---------------------------------------------------------------- row 2


def test_missing_prompt(http):
    assert_error(http.post(COMPL, json={"max_tokens": 3}), 400, "prompt")


def test_missing_messages(http):
    assert_error(http.post(CHAT, json={"max_tokens": 3}), 400, "messages")


@pytest.mark.parametrize("prompt", ["", [], [""], [[]], ["a", ""]])
def test_empty_prompt(http, prompt):
    assert_error(http.post(COMPL, json={"prompt": prompt}), 400, "prompt")


def test_empty_messages(http):
    assert_error(http.post(CHAT, json={"messages": []}), 400, "messages")


@pytest.mark.parametrize("prompt", [5, {"a": 1}, [1, "a"], [[1], 5], [["a"]], True])
def test_prompt_of_wrong_type(http, prompt):
    assert_error(http.post(COMPL, json={"prompt": prompt}), 400, "prompt")


# ---------------------------------------------------------------- row 3


@pytest.mark.parametrize("prompt", [[1, -1], [MODEL_VOCAB], [[5, 6], [MODEL_VOCAB + 100]], [2**40]])
def test_token_ids_out_of_vocab(http, prompt):
    err = assert_error(http.post(COMPL, json={"prompt": prompt}), 400, "prompt")
    assert str(MODEL_VOCAB) in err["message"]


def test_token_id_just_inside_the_embedding_is_accepted(http):
    # Embedding rows may exceed the tokenizer's size; those ids are valid.
    assert http.post(COMPL, json={"prompt": [MODEL_VOCAB - 1], "max_tokens": 1}).status_code == 200


def test_detokenize_out_of_vocab(http):
    assert_error(http.post("/detokenize", json={"tokens": [1, MODEL_VOCAB]}), 400, "tokens")


# ---------------------------------------------------------------- row 4


@pytest.mark.parametrize("value", [0, -1, 1.5, "5", True, [3]])
def test_bad_max_tokens(http, value):
    assert_error(http.post(COMPL, json={"prompt": "x", "max_tokens": value}), 400, "max_tokens")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_bad_chat_max_tokens(http, field):
    assert_error(http.post(CHAT, json={"messages": MSGS, field: 0}), 400, field)


# ---------------------------------------------------------------- row 5


def test_prompt_longer_than_context(http):
    r = http.post(COMPL, json={"prompt": "x" * (MAX_MODEL_LEN + 10), "max_tokens": 1})
    err = assert_error(r, 400, "prompt")
    assert str(MAX_MODEL_LEN) in err["message"] and str(MAX_MODEL_LEN + 11) in err["message"]


def test_prompt_plus_max_tokens_over_context(http):
    r = http.post(COMPL, json={"prompt": "x" * 99, "max_tokens": 200})  # 100 with BOS
    err = assert_error(r, 400, "max_tokens")
    for number in (MAX_MODEL_LEN, 300, 100, 200):
        assert str(number) in err["message"]


def test_chat_prompt_plus_max_tokens_over_context(http):
    r = http.post(CHAT, json={"messages": MSGS, "max_completion_tokens": MAX_MODEL_LEN})
    err = assert_error(r, 400, "max_completion_tokens")
    assert str(MAX_MODEL_LEN) in err["message"]


def test_chat_messages_longer_than_context(http):
    msgs = [{"role": "user", "content": "y" * MAX_MODEL_LEN}]
    assert_error(http.post(CHAT, json={"messages": msgs}), 400, "messages")


def test_default_max_tokens_is_clipped_to_the_context(http, fakes):
    # No max_tokens: 16 by default, but never past the context (no error for the user).
    r = http.post(COMPL, json={"prompt": "z" * (MAX_MODEL_LEN - 5)})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


# ---------------------------------------------------------------- row 6


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.5),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1),
        ("presence_penalty", 3),
        ("frequency_penalty", -3),
        ("temperature", "hot"),
    ],
)
@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_sampling_ranges(http, path, field, value):
    body = {"prompt": "x"} if path == COMPL else {"messages": MSGS}
    body[field] = value
    assert_error(http.post(path, json=body), 400, field)


def test_nan_temperature_is_refused(http):
    r = http.post(
        COMPL,
        content=b'{"prompt": "x", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert_error(r, 400, "temperature")


# ---------------------------------------------------------------- row 7


def test_logprobs_above_cap(http):
    assert_error(http.post(COMPL, json={"prompt": "x", "logprobs": 21}), 400, "logprobs")


def test_top_logprobs_above_cap(http):
    r = http.post(CHAT, json={"messages": MSGS, "logprobs": True, "top_logprobs": 21})
    assert_error(r, 400, "top_logprobs")


def test_top_logprobs_without_logprobs(http):
    assert_error(http.post(CHAT, json={"messages": MSGS, "top_logprobs": 3}), 400, "top_logprobs")


@pytest.mark.parametrize("value", [21, -1, 1000])
def test_prompt_logprobs_above_cap(http, value):
    r = http.post(COMPL, json={"prompt": "x", "prompt_logprobs": value})
    assert_error(r, 400, "prompt_logprobs")


@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_prompt_logprobs_with_stream(http, path):
    body = {"prompt": "x"} if path == COMPL else {"messages": MSGS}
    body.update(stream=True, prompt_logprobs=1)
    assert_error(http.post(path, json=body), 400, "prompt_logprobs")


def test_max_logprobs_config_caps(make_gateway):
    gw = make_gateway(max_logprobs=2)
    with gw.client() as c:
        assert_error(c.post(COMPL, json={"prompt": "x", "logprobs": 3}), 400, "logprobs")
        assert (
            c.post(COMPL, json={"prompt": "x", "logprobs": 2, "max_tokens": 1}).status_code == 200
        )


# ---------------------------------------------------------------- row 8


@pytest.mark.parametrize("n", [129, 10**9, 0, -1])
def test_bad_n(http, n):
    assert_error(http.post(COMPL, json={"prompt": "x", "n": n}), 400, "n")


def test_too_many_stop_strings(http):
    stops = [f"s{i}" for i in range(65)]
    assert_error(http.post(COMPL, json={"prompt": "x", "stop": stops}), 400, "stop")


def test_empty_stop_string(http):
    assert_error(http.post(COMPL, json={"prompt": "x", "stop": [""]}), 400, "stop")


@pytest.mark.parametrize("bias", [{str(MODEL_VOCAB): 1}, {"-1": 1}, {"abc": 1}, {"1.5": 1}])
def test_logit_bias_out_of_vocab(http, bias):
    assert_error(http.post(COMPL, json={"prompt": "x", "logit_bias": bias}), 400, "logit_bias")


def test_stop_token_ids_out_of_vocab(http):
    r = http.post(COMPL, json={"prompt": "x", "stop_token_ids": [MODEL_VOCAB]})
    assert_error(r, 400, "stop_token_ids")


def test_too_many_sequences(http):
    assert_error(http.post(COMPL, json={"prompt": ["a"] * 129}), 400, "prompt")
    # prompts x n is capped too: one request cannot open thousands of streams.
    assert_error(http.post(COMPL, json={"prompt": ["a"] * 12, "n": 11}), 400, "prompt")


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_seed_out_of_int64(http, seed):
    assert_error(http.post(COMPL, json={"prompt": "x", "seed": seed}), 400, "seed")


def test_min_tokens_above_max_tokens(http):
    r = http.post(COMPL, json={"prompt": "x", "max_tokens": 2, "min_tokens": 5})
    assert_error(r, 400, "min_tokens")


@pytest.mark.parametrize(
    "field,value",
    [
        ("suffix", "end"),
        ("best_of", 3),
    ],
)
def test_unsupported_fields(http, field, value):
    assert_error(http.post(COMPL, json={"prompt": "x", field: value}), 400, field)


def test_stream_options_without_stream(http):
    r = http.post(COMPL, json={"prompt": "x", "stream_options": {"include_usage": True}})
    assert_error(r, 400, "stream_options")


# ---------------------------------------------------------------- row 10


@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_unknown_model(http, path):
    body = {"prompt": "x"} if path == COMPL else {"messages": MSGS}
    body["model"] = "no-such-model"
    assert_error(http.post(path, json=body), 404, "model", code="model_not_found")


def test_alias_is_served_and_first_name_reported(http):
    r = http.post(COMPL, json={"prompt": "x", "model": "alias", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "fake-model"


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v1/moderations"),
        ("POST", "/v1/images/generations"),
        ("GET", "/v1/nothing"),
        ("POST", "/v1/audio/speech"),
    ],
)
def test_unserved_endpoint(http, method, path):
    err = assert_error(http.request(method, path, json={}), 404)
    assert "not served by splitserve" in err["message"]


def test_wrong_method(http):
    assert_error(http.get(COMPL), 405)


# ---------------------------------------------------------------- row 14


def test_oversized_body(make_gateway):
    gw = make_gateway(max_body_bytes=2000)
    with gw.client() as c:
        assert_error(c.post(COMPL, json={"prompt": "x" * 3000}), 413)

        def chunks():  # no Content-Length: counted while streaming in
            for _ in range(10):
                yield b" " * 500
            yield b'{"prompt": "x"}'

        assert_error(
            c.post(COMPL, content=chunks(), headers={"content-type": "application/json"}), 413
        )
        assert c.post(COMPL, json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_oversized_headers_do_not_break_the_server(gateway, http):
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    if data:  # a 4xx status or a closed connection, never 5xx
        status = int(data.split(b" ", 2)[1])
        assert status in (400, 413, 431), data[:200]
    assert http.get("/health").status_code == 200


# ---------------------------------------------------------------- row 15


def test_api_key(make_gateway):
    gw = make_gateway(api_key="s3cret-key")
    with gw.client() as c:
        body = {"prompt": "x", "max_tokens": 1}
        err = assert_error(c.post(COMPL, json=body), 401, code="invalid_api_key")
        assert "s3cret" not in err["message"]
        assert_error(c.post(COMPL, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.post(COMPL, json=body, headers={"Authorization": "s3cret-key"}), 401)
        assert_error(c.get("/v1/models"), 401)
        ok = {"Authorization": "Bearer s3cret-key"}
        assert c.post(COMPL, json=body, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200  # the probes never need the key
        assert c.get("/version").status_code == 200
        assert c.get("/ping").status_code == 200 and c.post("/ping").status_code == 200
        # Every other route does, /v1 or not (vLLM guards only /v1).
        assert_error(c.post("/tokenize", json={"prompt": "x"}), 401, code="invalid_api_key")
        assert_error(c.post("/detokenize", json={"tokens": [1]}), 401, code="invalid_api_key")
        for path in ("/metrics", "/docs", "/openapi.json", "/load", "/no-such-route"):
            assert_error(c.get(path), 401, code="invalid_api_key")
        assert c.post("/tokenize", json={"prompt": "x"}, headers=ok).status_code == 200
        assert c.post("/detokenize", json={"tokens": [1]}, headers=ok).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200
        assert c.get("/openapi.json", headers=ok).status_code == 200


def test_disable_metrics_auth_opens_only_metrics(make_gateway):
    gw = make_gateway(api_key="s3cret-key", disable_metrics_auth=True)
    with gw.client() as c:
        assert c.get("/metrics").status_code == 200
        assert_error(c.post("/tokenize", json={"prompt": "x"}), 401, code="invalid_api_key")
        assert_error(c.get("/v1/models"), 401, code="invalid_api_key")


def test_api_key_with_openai_client(make_gateway):
    import openai

    gw = make_gateway(api_key="k1")
    good = openai.OpenAI(base_url=gw.url + "/v1", api_key="k1", max_retries=0)
    assert good.completions.create(model="fake-model", prompt="x", max_tokens=1).choices
    bad = openai.OpenAI(base_url=gw.url + "/v1", api_key="k2", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="fake-model", prompt="x", max_tokens=1)


# ---------------------------------------------------------------- row 16


def _raw(http, path, body: bytes):
    return http.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "body,param",
    [
        (b'{"prompt": "a\\u0000b"}', "prompt"),
        (b'{"prompt": "a\\ud800b"}', "prompt"),
        (b'{"prompt": ["ok", "\\udfff"]}', "prompt"),
        (b'{"prompt": "x", "stop": ["\\ud83d"]}', "stop"),
        (b'{"prompt": "x", "model": "\\ud800"}', "model"),
        (b'{"prompt": "x", "user": "a\\u0000"}', "user"),
    ],
)
def test_nul_and_lone_surrogates_completions(http, body, param):
    assert_error(_raw(http, COMPL, body), 400, param)


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\u0000"}]}]}',
        b'{"messages": [{"role": "us\\udc00er", "content": "x"}]}',
    ],
)
def test_nul_and_lone_surrogates_chat(http, body):
    assert_error(_raw(http, CHAT, body), 400, "messages")


def test_invalid_utf8(http):
    assert_error(_raw(http, COMPL, b'{"prompt": "\xff\xfe\xc3"}'), 400, None)


def test_valid_astral_characters_pass(http):
    # A proper surrogate pair in JSON is one valid character, not an error.
    r = _raw(http, COMPL, b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}')
    assert r.status_code == 200, r.text


def test_api_key_from_environment(make_gateway, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_API_KEY", "from-env")
    gw = make_gateway()
    with gw.client() as c:
        assert_error(c.get("/v1/models"), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_large_body_with_a_small_head_is_served(gateway):
    # The head bound counts whole reads until the head ends: a body read together with the
    # head (one send here) must not count against it.
    host, port = gateway.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "fake-model", "prompt": "x" * 100_000, "max_tokens": 1}).encode()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nX-Filler: " + b"f" * 15_000 + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    assert status != 431, data[:300]
    assert status in (200, 400), data[:300]  # 400: the prompt may exceed the model's length


# ---------------------------------------------------------------- row 30


def _char_limit() -> int:
    return MAX_MODEL_LEN * max(len(token_text(t)) for t in range(TOKENIZER_VOCAB))


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/tokenize", lambda text: {"prompt": text}, "prompt"),
        ("/tokenize", lambda text: {"messages": [{"role": "user", "content": text}]}, "messages"),
        (COMPL, lambda text: {"prompt": text, "max_tokens": 1}, "prompt"),
        (COMPL, lambda text: {"prompt": ["ok", text], "max_tokens": 1}, "prompt"),
        (CHAT, lambda text: {"messages": [{"role": "user", "content": text}]}, "messages"),
    ],
)
def test_a_text_past_any_prompt_that_fits_is_refused_before_tokenizing(
    http, fakes, path, body, param
):
    # A prompt of max_model_len tokens holds at most max_model_len x max_token_chars
    # characters: past that, a 400 without a call to the tokenizer service.
    calls = len(fakes.tokenizer.rpcs)
    err = assert_error(http.post(path, json=body("x" * (_char_limit() + 1))), 400, param)
    assert "maximum context length of 256 tokens" in err["message"]
    assert len(fakes.tokenizer.rpcs) == calls, fakes.tokenizer.rpcs[calls:]


def test_the_longest_text_that_may_fit_is_tokenized(http):
    r = http.post("/tokenize", json={"prompt": "x" * _char_limit()})
    assert r.status_code == 200, r.text
    assert r.json()["count"] > 256  # /tokenize counts past the context, as vLLM's does


def test_detokenize_takes_at_most_the_context(http, fakes):
    calls = len(fakes.tokenizer.rpcs)
    err = assert_error(http.post("/detokenize", json={"tokens": [104] * 257}), 400, "tokens")
    assert "maximum context length of 256 tokens" in err["message"]
    assert len(fakes.tokenizer.rpcs) == calls
    assert http.post("/detokenize", json={"tokens": [104] * 256}).status_code == 200
