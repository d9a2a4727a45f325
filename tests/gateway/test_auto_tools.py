"""tool_choice "auto" and reasoning through the real app, against the fakes: a gateway started
with --enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3, a "model"
that writes tool-call markup, and the official openai client reading full and streamed
responses (the stream's accumulation must equal the full response)."""

from __future__ import annotations

import openai
import pytest

from splitserve.gateway.protocol import ChatCompletionStreamResponse

from .conftest import start_gateway, stop_gateway
from .test_completions import sse_events, tag
from .test_tools import TOOLS, say

CHAT = "/v1/chat/completions"
CALLS = (
    "Checking.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)
THINK = (
    "<think>\nWeather needs a tool.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def auto_gateway(loop_thread, fakes):
    gw = start_gateway(
        loop_thread,
        fakes,
        enable_auto_tool_choice=True,
        tool_call_parser="hermes",
        reasoning_parser="qwen3",
    )
    yield gw
    stop_gateway(loop_thread, gw)


@pytest.fixture(scope="module")
def auto_http(auto_gateway):
    with auto_gateway.client() as client:
        yield client


@pytest.fixture
def auto_client(auto_gateway):
    return openai.OpenAI(base_url=auto_gateway.url + "/v1", api_key="none", max_retries=0)


def ask(prompt, **kw):
    return dict(
        model="fake-model", messages=[{"role": "user", "content": prompt}], tools=TOOLS, **kw
    )


def summary(message) -> tuple:
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return message.content, calls


def test_auto_calls_full_and_streamed_agree(auto_client, fakes):
    prompt = say(fakes, CALLS)
    r = auto_client.chat.completions.create(**ask(prompt))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    content, calls = summary(choice.message)
    assert content == "Checking."
    assert calls == [("get_weather", '{"city": "Zürich"}'), ("get_time", "{}")]
    assert all(
        c.id.startswith("chatcmpl-tool-") and c.type == "function"
        for c in choice.message.tool_calls
    )
    with auto_client.beta.chat.completions.stream(**ask(prompt)) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert summary(final.choices[0].message) == (content, calls)


def test_stream_chunks(auto_http, fakes):
    prompt = say(fakes, CALLS)
    body = {"messages": [{"role": "user", "content": prompt}], "tools": TOOLS, "stream": True}
    events = sse_events(auto_http.post(CHAT, json=body).text)
    for event in events:
        ChatCompletionStreamResponse.model_validate(event)
    deltas = [e["choices"][0]["delta"] for e in events]
    calls = [d for delta in deltas for d in delta.get("tool_calls", [])]
    headers = [d for d in calls if "id" in d]
    assert [(h["index"], h["type"], h["function"]["name"]) for h in headers] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    # Arguments stream in fragments; no markup leaks into content.
    assert sum(1 for d in calls if "id" not in d and d["index"] == 0) > 3
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Checking."
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "tool_calls"


def test_reasoning_then_call(auto_http, fakes):
    prompt = say(fakes, THINK)
    body = {"messages": [{"role": "user", "content": prompt}], "tools": TOOLS}
    message = auto_http.post(CHAT, json=body).json()["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "\nWeather needs a tool.\n"
    assert message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    events = sse_events(auto_http.post(CHAT, json={**body, "stream": True}).text)
    deltas = [e["choices"][0]["delta"] for e in events]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert reasoning == "".join(d.get("reasoning") or "" for d in deltas) == message["reasoning"]
    first_call = next(k for k, d in enumerate(deltas) if d.get("tool_calls"))
    assert not any(d.get("reasoning") for d in deltas[first_call:])


def test_n_choices_parse_separately(auto_http, fakes):
    texts = [CALLS, "Just text, no call."]
    prompt = say(fakes, texts)
    body = {"messages": [{"role": "user", "content": prompt}], "tools": TOOLS, "n": 2}
    choices = sorted(auto_http.post(CHAT, json=body).json()["choices"], key=lambda c: c["index"])
    assert [c["finish_reason"] for c in choices] == ["tool_calls", "stop"]
    assert len(choices[0]["message"]["tool_calls"]) == 2
    assert choices[1]["message"] == {
        "role": "assistant",
        "content": "Just text, no call.",
        "reasoning": None,
        "reasoning_content": None,
        "tool_calls": [],
    }
    events = sse_events(auto_http.post(CHAT, json={**body, "stream": True}).text)
    content = {0: "", 1: ""}
    names = {0: [], 1: []}
    for e in events:
        c = e["choices"][0]
        content[c["index"]] += c["delta"].get("content") or ""
        names[c["index"]] += [
            d["function"]["name"] for d in c["delta"].get("tool_calls", []) if "id" in d
        ]
    assert content == {0: "Checking.", 1: "Just text, no call."}
    assert names == {0: ["get_weather", "get_time"], 1: []}


def test_malformed_markup_stays_content(auto_http, fakes):
    text = '<tool_call>{get_weather: "Oslo"}</tool_call>'
    prompt = say(fakes, text)
    body = {"messages": [{"role": "user", "content": prompt}], "tools": TOOLS}
    r = auto_http.post(CHAT, json=body)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == text and choice["message"]["tool_calls"] == []
    assert choice["finish_reason"] == "stop"
    events = sse_events(auto_http.post(CHAT, json={**body, "stream": True}).text)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == text


def test_cut_by_max_tokens(auto_http, fakes):
    prompt = say(fakes, CALLS)
    body = {"messages": [{"role": "user", "content": prompt}], "tools": TOOLS, "max_tokens": 40}
    choice = auto_http.post(CHAT, json=body).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == CALLS.encode()[:40].decode()
    assert choice["message"]["tool_calls"] == []


@pytest.mark.parametrize("tool_choice", ["none", None])
def test_no_parsing_without_auto(auto_http, fakes, tool_choice):
    """tool_choice "none" (or no tools at all) leaves the markup in the content."""
    prompt = say(fakes, CALLS)
    body = {"messages": [{"role": "user", "content": prompt}]}
    if tool_choice is not None:
        body.update(tools=TOOLS, tool_choice=tool_choice)
    message = auto_http.post(CHAT, json=body).json()["choices"][0]["message"]
    assert message["content"] == CALLS and message["tool_calls"] == []


def test_required_still_constrains(auto_http, fakes):
    prompt = say(fakes, '[{"name": "get_time", "parameters": {}}]')
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "tool_choice": "required",
    }
    choice = auto_http.post(CHAT, json=body).json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    assert fakes.scheduler.calls_matching(prompt)[0].request.HasField("compiled_grammar")


def test_plain_output_without_tags_is_content(auto_http, fakes):
    t = tag()
    body = {"messages": [{"role": "user", "content": t}], "max_tokens": 9}
    message = auto_http.post(CHAT, json=body).json()["choices"][0]["message"]
    assert message["content"] == "The quick" and message["reasoning"] is None


def test_mistral_keeps_special_tokens_in_the_text(make_gateway):
    """[TOOL_CALLS] is a special token: with the mistral parser and tools, detokenization keeps
    special tokens (seen here as the fake's EOS text)."""
    gw = make_gateway(enable_auto_tool_choice=True, tool_call_parser="mistral")
    body = {
        "messages": [{"role": "user", "content": f"#eos@2 {tag()}"}],
        "tools": TOOLS,
        "max_tokens": 4,
        "ignore_eos": True,
    }
    with gw.client() as http:
        kept = http.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
        skipped = http.post(CHAT, json={**body, "tool_choice": "none"}).json()
    assert kept == "Th</s> "
    assert skipped["choices"][0]["message"]["content"] == "Th "


def test_parallel_tool_calls_false_keeps_the_first(auto_http, fakes):
    prompt = say(fakes, CALLS)
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "parallel_tool_calls": False,
    }
    choice = auto_http.post(CHAT, json=body).json()["choices"][0]
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
    assert choice["finish_reason"] == "tool_calls"
    events = sse_events(auto_http.post(CHAT, json={**body, "stream": True}).text)
    calls = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls", [])]
    assert {d["index"] for d in calls} == {0}


def test_include_reasoning_false_drops_it(auto_http, fakes):
    prompt = say(fakes, THINK)
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "include_reasoning": False,
    }
    message = auto_http.post(CHAT, json=body).json()["choices"][0]["message"]
    assert message["reasoning"] is None and message["reasoning_content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    events = sse_events(auto_http.post(CHAT, json={**body, "stream": True}).text)
    assert not any("reasoning" in e["choices"][0]["delta"] for e in events)
    assert not any("reasoning_content" in e["choices"][0]["delta"] for e in events)
