"""/v1/chat/completions against the fakes: template, logprobs format, streaming, n, stop."""

from __future__ import annotations

import openai
import pytest

from splitserve.gateway.protocol import ChatCompletionResponse, ChatCompletionStreamResponse

from .fakes import MAX_MODEL_LEN, SCRIPT
from .test_completions import sse_events, tag
from .test_validation import assert_error

CHAT = "/v1/chat/completions"


def rendered(messages, generation_prompt: bool = True) -> str:
    """What the fake template renders, to know the prompt length."""
    text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
    return text + ("<|assistant|>" if generation_prompt else "")


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)


def test_basic(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="fake-model", messages=msgs, max_tokens=5)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == SCRIPT[:5]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(rendered(msgs))
    assert r.usage.completion_tokens == 5


def test_default_max_tokens_is_rest_of_context(http, fakes):
    t = tag()
    msgs = [{"role": "user", "content": f"#hold@3 {t}"}]
    # The fake holds after 3 tokens; only the scheduler's max_tokens matters here.
    with http.stream("POST", CHAT, json={"messages": msgs, "stream": True}) as r:
        next(r.iter_lines())
    (call,) = fakes.scheduler.calls_matching(t)
    assert call.request.sampling_params.max_tokens == MAX_MODEL_LEN - len(rendered(msgs))


def test_max_completion_tokens_alias(client):
    r = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], max_completion_tokens=3
    )
    assert r.usage.completion_tokens == 3


def test_stream_role_first_then_content(client):
    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == SCRIPT[:4]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"


def test_stream_chunks_match_schema(http):
    r = http.post(
        CHAT,
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 1,
        },
    )
    for event in sse_events(r.text):
        ChatCompletionStreamResponse.model_validate(event)


def test_n_stream_each_choice_gets_role(http):
    r = http.post(
        CHAT,
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "n": 3,
            "stream": True,
        },
    )
    events = sse_events(r.text)
    roles = [c["index"] for e in events for c in e["choices"] if c["delta"].get("role")]
    assert sorted(roles) == [0, 1, 2]
    for i in range(3):
        text = "".join(
            c["delta"].get("content", "") for e in events for c in e["choices"] if c["index"] == i
        )
        assert text == SCRIPT[:2]


def test_logprobs_chat_format(http):
    r = http.post(
        CHAT,
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    body = r.json()
    ChatCompletionResponse.model_validate(body)
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "T",
        "logprob": -0.25,
        "bytes": [84],
        "top_logprobs": [
            {"token": "T", "logprob": -0.25, "bytes": [84]},
            {"token": "U", "logprob": -1.25, "bytes": [85]},
        ],
    }
    assert [c["token"] for c in content] == ["T", "h"]


def test_logprobs_without_top(http):
    r = http.post(
        CHAT,
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "logprobs": True},
    )
    assert r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


def test_no_logprobs_is_null(http):
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert r.json()["choices"][0]["logprobs"] is None


def test_stream_logprobs(http):
    r = http.post(
        CHAT,
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 1,
            "stream": True,
        },
    )
    tokens = [
        lp["token"]
        for e in sse_events(r.text)
        for c in e["choices"]
        if c["logprobs"]
        for lp in c["logprobs"]["content"]
    ]
    assert tokens == list(SCRIPT[:3])


def test_stop_string_cancels_generate(http, fakes):
    t = tag()
    r = http.post(
        CHAT,
        json={
            "messages": [{"role": "user", "content": f"#hold@40 {t}"}],
            "max_tokens": 100,
            "stop": ["fox"],
        },
    )
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "The quick brown "
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "fox"
    assert r.json()["usage"]["completion_tokens"] == len("The quick brown fox")
    assert fakes.scheduler.waiter.wait_for(
        lambda: [c.cancelled for c in fakes.scheduler.calls_matching(t)] == [True]
    )


def test_text_content_parts_are_joined(http, fakes):
    t = tag()
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": t}]}
    ]
    assert http.post(CHAT, json={"messages": msgs, "max_tokens": 1}).status_code == 200
    (call,) = fakes.scheduler.calls_matching(t)
    assert f"<|user|>a\n{t}\n" in call.prompt_text


def test_image_part_refused(http):
    """Remote image fetch is off by default: a 400 naming the part, before any fetch."""
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}],
        }
    ]
    r = http.post(CHAT, json={"messages": msgs})
    assert_error(r, 400, "messages[0].content[0].image_url")
    assert "--allowed-media-domains" in r.json()["error"]["message"]
    msgs[0]["content"][0] = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    r = http.post(CHAT, json={"messages": msgs})
    assert_error(r, 400, "messages[0].content[0].input_audio")
    assert "non-empty base64" in r.json()["error"]["message"]
    msgs[0]["content"][0] = {
        "type": "input_audio",
        "input_audio": {"data": "AA==", "format": "aac"},
    }
    r = http.post(CHAT, json={"messages": msgs})
    assert_error(r, 400, "messages[0].content[0].input_audio")
    assert "format must be one of wav, mp3, flac, ogg" in r.json()["error"]["message"]


def test_untrusted_chat_template_is_400(http):
    r = http.post(
        CHAT,
        json={"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ messages }}"},
    )
    assert_error(r, 400, "chat_template")


def test_tool_choice_auto_refused(http):
    r = http.post(
        CHAT,
        json={
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto",
        },
    )
    assert_error(r, 400, "tool_choice")


def test_tools_reach_the_template(http, fakes):
    t = tag()
    r = http.post(
        CHAT,
        json={
            "messages": [{"role": "user", "content": t}],
            "max_tokens": 1,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "none",
        },
    )
    assert r.status_code == 200
    (call,) = fakes.scheduler.calls_matching(t)
    assert call.prompt_text.startswith("<|tools|>1\n")
    assert not call.request.HasField("grammar") and not call.request.HasField("compiled_grammar")


def test_continue_final_message(http, fakes):
    t = tag()
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": f"Sure {t}"}]
    r = http.post(
        CHAT,
        json={
            "messages": msgs,
            "max_tokens": 1,
            "add_generation_prompt": False,
            "continue_final_message": True,
            "echo": True,
        },
    )
    assert r.json()["choices"][0]["message"]["content"] == f"Sure {t}T"
    bad = http.post(CHAT, json={"messages": msgs, "continue_final_message": True})
    assert_error(bad, 400, "continue_final_message")


def test_prompt_logprobs_top_level(http):
    r = http.post(
        CHAT,
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 1,
            "prompt_logprobs": 0,
        },
    )
    plp = r.json()["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(rendered([{"role": "user", "content": "x"}]))


def test_tokenize_and_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "ab", "return_token_strs": True})
    assert r.json() == {
        "count": 3,
        "max_model_len": MAX_MODEL_LEN,
        "tokens": [256, 97, 98],
        "token_strs": ["<s>", "a", "b"],
    }
    msgs = [{"role": "user", "content": "x"}]
    r = http.post("/tokenize", json={"messages": msgs})
    assert r.json()["count"] == len(rendered(msgs))
    r = http.post("/detokenize", json={"tokens": [72, 105]})
    assert r.json() == {"prompt": "Hi"}
    assert_error(http.post("/tokenize", json={"nothing": 1}), 400, "prompt")
    assert_error(http.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404, "model")


def test_models_and_version(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake-model", "alias"]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert models["data"][0]["root"] == "fake/model"
    assert http.get("/version").json()["version"]
    assert http.get("/openapi.json").status_code == 200
