"""vLLM's request extensions at the gateway: allowed_token_ids and bad_words reach the
scheduler (bad_words tokenized by the tokenizer service), return_tokens_as_token_ids and
request_id shape the response, the extensions splitserve does not serve are refused by name,
and fields nobody reads are logged as ignored."""

from __future__ import annotations

import concurrent.futures
import logging
import uuid

import pytest

from .conftest import wait_until
from .fakes import MODEL_VOCAB, encode
from .test_validation import assert_error

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"


def body(path: str, text: str, **extra) -> dict:
    if path == CHAT:
        return {"messages": [{"role": "user", "content": text}], "max_tokens": 3, **extra}
    return {"prompt": text, "max_tokens": 3, **extra}


def tag() -> str:
    return uuid.uuid4().hex[:10]


# ------------------------------------------------------------------ refused by name


@pytest.mark.parametrize("path", [COMPL, CHAT])
@pytest.mark.parametrize(
    "field,value",
    [
        ("use_beam_search", True),
        ("length_penalty", 0.5),
        ("logits_processors", ["my.module:Processor"]),
        ("vllm_xargs", {"k": 1}),
        ("kv_transfer_params", {"do_remote_prefill": True}),
    ],
)
def test_unserved_extensions_are_400_naming_the_field(http, fakes, path, field, value):
    t = tag()
    err = assert_error(http.post(path, json=body(path, f"x {t}", **{field: value})), 400, field)
    assert "not support" in err["message"] or "does not have" in err["message"]
    assert not fakes.scheduler.calls_matching(t)


def test_endpoint_specific_extensions_are_refused(http):
    assert_error(
        http.post(COMPL, json=body(COMPL, "x", prompt_embeds="AAAA")), 400, "prompt_embeds"
    )
    assert_error(
        http.post(CHAT, json=body(CHAT, "x", mm_processor_kwargs={"fps": 1})),
        400,
        "mm_processor_kwargs",
    )


@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_defaults_of_refused_fields_are_accepted(http, path):
    r = http.post(path, json=body(path, "x", use_beam_search=False, length_penalty=1.0))
    assert r.status_code == 200, r.text


def test_ignored_fields_are_logged(http, caplog):
    with caplog.at_level(logging.WARNING, logger="splitserve.gateway.protocol"):
        r = http.post(COMPL, json=body(COMPL, "x", not_a_field=1, metadata={"a": "b"}))
    assert r.status_code == 200, r.text
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("ignored" in m and "not_a_field" in m and "metadata" in m for m in messages)


# ------------------------------------------------------------------ allowed_token_ids


@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_allowed_token_ids_reach_the_scheduler_deduplicated(http, fakes, path):
    t = tag()
    r = http.post(path, json=body(path, f"a {t}", allowed_token_ids=[65, 66, 65, 259], n=2))
    assert r.status_code == 200, r.text
    calls = fakes.scheduler.calls_matching(t)
    assert len(calls) == 2
    for call in calls:
        assert list(call.request.sampling_params.allowed_token_ids) == [65, 66, 259]


@pytest.mark.parametrize(
    "value,fragment",
    [([], "empty"), ([1, MODEL_VOCAB], "outside"), ([-1], "outside"), ("65", None)],
)
def test_bad_allowed_token_ids_are_400(http, fakes, value, fragment):
    t = tag()
    err = assert_error(
        http.post(COMPL, json=body(COMPL, f"a {t}", allowed_token_ids=value)),
        400,
        "allowed_token_ids",
    )
    if fragment:
        assert fragment in err["message"]
    assert not fakes.scheduler.calls_matching(t)


def test_no_allowed_token_ids_sends_none(http, fakes):
    t = tag()
    assert http.post(COMPL, json=body(COMPL, f"a {t}")).status_code == 200
    (call,) = fakes.scheduler.calls_matching(t)
    assert not call.request.sampling_params.allowed_token_ids
    assert not call.request.sampling_params.bad_words_token_ids


# ------------------------------------------------------------------ bad_words


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_bad_words_are_tokenized_in_both_spellings(http, fakes, path, stream):
    t = tag()
    r = http.post(path, json=body(path, f"b {t}", bad_words=["fox", " dog", "fox"], stream=stream))
    assert r.status_code == 200, r.text
    (call,) = fakes.scheduler.calls_matching(t)
    got = [list(s.token_ids) for s in call.request.sampling_params.bad_words_token_ids]
    # The fake tokenizer is byte-level: each spelling is its bytes; duplicates collapse.
    assert got == [encode("fox"), encode(" fox"), encode("dog"), encode(" dog")]


@pytest.mark.parametrize(
    "value,fragment",
    [([""], "empty"), (["  "], "blank"), (["x" * 300], "at most"), (["w"] * 300, "at most")],
)
def test_bad_bad_words_are_400(http, value, fragment):
    err = assert_error(http.post(COMPL, json=body(COMPL, "b", bad_words=value)), 400, "bad_words")
    assert fragment in err["message"]


# ------------------------------------------------------------------ response shape


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprob_tokens_as_token_ids(http, stream):
    r = http.post(
        COMPL,
        json=body(COMPL, "x", logprobs=2, return_tokens_as_token_ids=True, stream=stream),
    )
    assert r.status_code == 200, r.text
    text = r.text
    # The fake scheduler emits the bytes of "The quick ..."; "T" is byte 84.
    assert '"token_id:84"' in text
    assert '"T"' not in text.replace('"text":"T', "")  # only the text field holds the letter


def test_chat_logprob_tokens_as_token_ids(http):
    r = http.post(
        CHAT, json=body(CHAT, "x", logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True)
    )
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content[0]["token"] == "token_id:84"
    assert content[0]["bytes"] == list(b"token_id:84")
    assert all(top["token"].startswith("token_id:") for top in content[0]["top_logprobs"])


def test_server_flag_makes_token_ids_the_default(make_gateway):
    gw = make_gateway(return_tokens_as_token_ids=True)
    with gw.client() as c:
        r = c.post(COMPL, json=body(COMPL, "x", logprobs=1))
        assert r.json()["choices"][0]["logprobs"]["tokens"][0] == "token_id:84"
        r = c.post(COMPL, json=body(COMPL, "x", logprobs=1, return_tokens_as_token_ids=False))
        assert r.json()["choices"][0]["logprobs"]["tokens"][0] == "T"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path,prefix", [(COMPL, "cmpl"), (CHAT, "chatcmpl")])
def test_request_id_names_the_response(http, path, prefix, stream):
    r = http.post(path, json=body(path, "x", request_id="my-req.1", stream=stream))
    assert r.status_code == 200, r.text
    assert f'"id":"{prefix}-my-req.1"' in r.text.replace(" ", "")


def test_same_request_id_twice_at_once_does_not_collide(http, fakes, loop_thread):
    """Both requests are in the scheduler at once under their own engine ids."""
    t = tag()
    payload = body(COMPL, f"#gate {t}", request_id="dup")
    loop_thread.loop.call_soon_threadsafe(fakes.scheduler.gate.clear)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(http.post, COMPL, json=payload) for _ in range(2)]
            wait_until(lambda: len(fakes.scheduler.calls_matching(t)) == 2, what="both requests")
            loop_thread.loop.call_soon_threadsafe(fakes.scheduler.gate.set)
            results = [f.result(30) for f in futures]
    finally:
        loop_thread.loop.call_soon_threadsafe(fakes.scheduler.gate.set)
    assert [r.status_code for r in results] == [200, 200]
    assert {r.json()["id"] for r in results} == {"cmpl-dup"}
    calls = fakes.scheduler.calls_matching(t)
    assert len({c.request.request_id for c in calls}) == 2


@pytest.mark.parametrize("value", ["", "has space", "x" * 200, "a/b"])
def test_bad_request_id_is_400(http, value):
    assert_error(http.post(COMPL, json=body(COMPL, "x", request_id=value)), 400, "request_id")


# ------------------------------------------------------------------ return_token_ids


def _sse(text: str) -> list[dict]:
    import json

    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_completion_return_token_ids(http):
    r = http.post(COMPL, json=body(COMPL, "Hi", return_token_ids=True, n=2))
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["prompt_token_ids"] == encode("Hi", add_bos=True)
        assert bytes(choice["token_ids"]).decode() == choice["text"] == "The"
    plain = http.post(COMPL, json=body(COMPL, "Hi")).json()["choices"][0]
    assert plain.get("token_ids") is None and plain.get("prompt_token_ids") is None


def test_completion_return_token_ids_streamed_add_up(http):
    r = http.post(COMPL, json=body(COMPL, "Hi", return_token_ids=True, stream=True))
    chunks = [c for c in _sse(r.text) if c["choices"]]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == encode("Hi", add_bos=True)
    assert all("prompt_token_ids" not in c["choices"][0] for c in chunks[1:])
    ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert bytes(ids).decode() == "".join(c["choices"][0]["text"] for c in chunks) == "The"


def test_chat_return_token_ids(http):
    r = http.post(CHAT, json=body(CHAT, "Hi", return_token_ids=True))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["prompt_token_ids"] and bytes(t for t in data["prompt_token_ids"] if t < 256)
    choice = data["choices"][0]
    assert bytes(choice["token_ids"]).decode() == choice["message"]["content"] == "The"
    r = http.post(CHAT, json=body(CHAT, "Hi", return_token_ids=True, stream=True))
    chunks = [c for c in _sse(r.text) if c["choices"]]
    assert chunks[0]["prompt_token_ids"] == data["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert bytes(ids).decode() == "The"


def test_chat_documents_reach_the_template(http, fakes):
    t = tag()
    docs = [{"title": "t", "text": f"passage {t}"}]
    r = http.post(CHAT, json=body(CHAT, "q", documents=docs))
    assert r.status_code == 200, r.text
    (call,) = fakes.scheduler.calls_matching(f"passage {t}")
    assert f"<|document|>passage {t}" in call.prompt_text
    assert_error(http.post(CHAT, json=body(CHAT, "q", documents=[{"text": 1}])), 400, "documents")
