"""Forced tool calls and the official openai client's structured-output helpers, against the
fakes: the constraint sent to the scheduler, `tool_calls` in full and streamed responses,
finish_reason "tool_calls", n > 1, and the 400s."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest

from .fakes import grammar_compiled_spec
from .test_completions import sse_events, tag
from .test_validation import assert_error

CHAT = "/v1/chat/completions"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/unit"}},
            "required": ["city"],
            "$defs": {"unit": {"enum": ["C", "F"]}},
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters
TOOLS = [WEATHER, CLOCK]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
TWO_CALLS = (
    '[{"name": "get_weather", "parameters": {"city": "Paris, \\"FR\\"", "unit": "C"}}, '
    '{"name": "get_time", "parameters": {}}]'
)


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)


def say(fakes, text) -> str:
    """A prompt that makes the fake scheduler emit `text` (a list: one per sequence)."""
    key = "k" + tag()
    fakes.scheduler.say[key] = text
    return f"#say={key} {tag()}"


def sent_grammar(fakes, prompt: str):
    calls = fakes.scheduler.calls_matching(prompt)
    assert calls and all(c.request.HasField("compiled_grammar") for c in calls)
    return [grammar_compiled_spec(c.request.compiled_grammar) for c in calls]


def test_named_function(client, fakes):
    prompt = say(fakes, '{"city": "Oslo"}')
    r = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": prompt}],
        tools=TOOLS,
        tool_choice=NAMED,
        max_tokens=50,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    (grammar,) = sent_grammar(fakes, prompt)
    assert grammar.kind == "json"
    assert json.loads(grammar.spec) == WEATHER["function"]["parameters"]


def test_required_builds_an_array_of_calls(client, fakes):
    prompt = say(fakes, TWO_CALLS)
    r = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": prompt}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": 'Paris, "FR"', "unit": "C"}
    assert json.loads(calls[1].function.arguments) == {}
    assert len({c.id for c in calls}) == 2
    (grammar,) = sent_grammar(fakes, prompt)
    schema = json.loads(grammar.spec)
    assert grammar.kind == "json"
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    # $defs are hoisted to the root, where the tool's "#/$defs/unit" now points.
    assert schema["$defs"] == {"unit": {"enum": ["C", "F"]}}
    branches = schema["items"]["anyOf"]
    assert [b["properties"]["name"] for b in branches] == [
        {"type": "string", "enum": ["get_weather"]},
        {"type": "string", "enum": ["get_time"]},
    ]
    weather_params = dict(WEATHER["function"]["parameters"])
    del weather_params["$defs"]
    assert branches[0]["properties"]["parameters"] == weather_params
    assert branches[1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert all(b["required"] == ["name", "parameters"] for b in branches)
    assert all(b["additionalProperties"] is False for b in branches)


def test_parallel_tool_calls_false_allows_one_call(http, fakes):
    prompt = say(fakes, '[{"name": "get_time", "parameters": {}}]')
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    assert http.post(CHAT, json=body).status_code == 200
    (grammar,) = sent_grammar(fakes, prompt)
    assert json.loads(grammar.spec)["maxItems"] == 1


def accumulate(chunks) -> dict[int, dict]:
    """OpenAI tool_call deltas folded per choice into {index: {call index: call}}."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            calls = out.setdefault(choice["index"], {})
            for d in choice["delta"].get("tool_calls") or []:
                if "id" in d:
                    assert d["index"] not in calls and d["type"] == "function"
                    calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "args": ""}
                calls[d["index"]]["args"] += d["function"]["arguments"]
    return out


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_stream_matches_full_response(http, fakes, tool_choice):
    text = TWO_CALLS if tool_choice == "required" else '{"city": "Rome", "unit": "F"}'
    prompt = say(fakes, text)
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "max_tokens": 200,
    }
    full = http.post(CHAT, json=body).json()["choices"][0]
    events = sse_events(http.post(CHAT, json={**body, "stream": True}).text)
    first = events[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first.get("content") is None
    assert all("content" not in e["choices"][0]["delta"] for e in events[1:])
    # Arguments arrive over several chunks, not in one piece at the end.
    assert sum(1 for e in events if e["choices"][0]["delta"].get("tool_calls")) > 3
    finishes = [e["choices"][0]["finish_reason"] for e in events]
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])
    streamed = accumulate(events)[0]
    expected = full["message"]["tool_calls"]
    assert [(c["name"], c["args"]) for c in streamed.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in expected
    ]


def test_openai_stream_helper_accumulates_tool_calls(client, fakes):
    prompt = say(fakes, TWO_CALLS)
    with client.beta.chat.completions.stream(
        model="fake-model",
        messages=[{"role": "user", "content": prompt}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(choice.message.tool_calls[0].function.arguments)["unit"] == "C"


def test_n_sequences_each_get_their_calls(http, fakes):
    prompt = say(
        fakes,
        ['[{"name": "get_time", "parameters": {}}]', '[{"name": "get_weather", "parameters": {}}]'],
    )
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "tool_choice": "required",
        "n": 2,
    }
    choices = sorted(http.post(CHAT, json=body).json()["choices"], key=lambda c: c["index"])
    names = [[c["function"]["name"] for c in ch["message"]["tool_calls"]] for ch in choices]
    assert names == [["get_time"], ["get_weather"]]
    assert [c["finish_reason"] for c in choices] == ["tool_calls", "tool_calls"]
    grammars = sent_grammar(fakes, prompt)
    assert len(grammars) == 2 and grammars[0] == grammars[1]
    streamed = accumulate(sse_events(http.post(CHAT, json={**body, "stream": True}).text))
    assert [streamed[i][0]["name"] for i in (0, 1)] == ["get_time", "get_weather"]


def test_cut_by_max_tokens_keeps_length(http, fakes):
    prompt = say(fakes, '{"city": "Lisbon"}')
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "tool_choice": NAMED,
        "max_tokens": 5,
    }
    choice = http.post(CHAT, json=body).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"cit'
    # "required" output cut mid-array: not complete, so not "tool_calls".
    prompt = say(fakes, TWO_CALLS)
    body.update(messages=[{"role": "user", "content": prompt}], tool_choice="required")
    choice = http.post(CHAT, json={**body, "max_tokens": 30}).json()["choices"][0]
    assert choice["finish_reason"] == "length"


def test_tool_choice_none_is_free_text(http, fakes):
    t = tag()
    body = {
        "messages": [{"role": "user", "content": t}],
        "tools": TOOLS,
        "tool_choice": "none",
        "max_tokens": 3,
        "response_format": {"type": "json_object"},  # not a conflict: tools are not forced
    }
    r = http.post(CHAT, json=body).json()["choices"][0]
    assert r["message"]["content"] and r["message"]["tool_calls"] == []
    (call,) = fakes.scheduler.calls_matching(t)
    assert call.prompt_text.startswith("<|tools|>2\n")
    assert grammar_compiled_spec(call.request.compiled_grammar).kind == "json_object"


BAD = [
    ({"tools": TOOLS}, "tool_choice", "'auto'"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "required"),
    (
        {"tools": TOOLS, "tool_choice": "auto"},
        "tool_choice",
        "--enable-auto-tool-choice --tool-call-parser NAME",
    ),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        "'nope'",
    ),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "tool_choice must"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice must"),
    ({"tool_choice": "required"}, "tools", "at least one tool"),
    ({"tool_choice": NAMED}, "tool_choice", "not in tools"),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
        "tool_choice 'required'",
    ),
    (
        {"tools": TOOLS, "tool_choice": NAMED, "guided_regex": "a"},
        "guided_regex",
        "tool_choice function 'get_weather'",
    ),
    ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "tools", "name"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools", "'function'"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
            "tool_choice": "required",
        },
        "tools",
        "parameters",
    ),
    ({"tools": [CLOCK, CLOCK], "tool_choice": "required"}, "tools", "twice"),
    (
        {
            "tools": [
                WEATHER,
                {
                    "type": "function",
                    "function": {
                        "name": "g",
                        "parameters": {"type": "object", "$defs": {"unit": {"type": "string"}}},
                    },
                },
            ],
            "tool_choice": "required",
        },
        "tools",
        "'unit'",
    ),
    ({"tools": TOOLS, "tool_choice": "required", "echo": True}, "echo", "echo"),
]


@pytest.mark.parametrize("fields,param,words", BAD)
def test_bad_tool_requests_are_400(http, fakes, fields, param, words):
    before = len(fakes.tokenizer.compile_calls)
    t = tag()
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": t}], **fields})
    err = assert_error(r, 400, param)
    assert words in err["message"], err
    assert len(fakes.tokenizer.compile_calls) == before
    assert fakes.scheduler.calls_matching(t) == []


def test_tool_schema_refused_by_the_compiler_is_400(http, fakes):
    t = tag()
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"oneOf": [{"type": "object"}]}},
    }
    body = {
        "messages": [{"role": "user", "content": t}],
        "tools": [tool],
        "tool_choice": "required",
    }
    err = assert_error(http.post(CHAT, json=body), 400, "tool_choice")
    assert "oneOf" in err["message"]
    assert fakes.scheduler.calls_matching(t) == []


# ----------------------------------------------------------------------------- openai helpers


class Weather(pydantic.BaseModel):
    city: str
    days: int


def test_openai_parse_with_a_pydantic_model(client, fakes):
    prompt = say(fakes, '{"city": "Kyiv", "days": 3}')
    r = client.beta.chat.completions.parse(
        model="fake-model",
        messages=[{"role": "user", "content": prompt}],
        response_format=Weather,
        max_tokens=100,
    )
    assert r.choices[0].message.parsed == Weather(city="Kyiv", days=3)
    (grammar,) = sent_grammar(fakes, prompt)
    schema = json.loads(grammar.spec)
    assert grammar.kind == "json"
    assert schema["properties"].keys() == {"city", "days"}
    assert schema["additionalProperties"] is False  # the client's strict form, passed as is


def test_openai_parse_with_a_pydantic_tool(client, fakes):
    prompt = say(fakes, '{"city": "Lima", "days": 2}')
    tool = openai.pydantic_function_tool(Weather, name="weather")
    r = client.beta.chat.completions.parse(
        model="fake-model",
        messages=[{"role": "user", "content": prompt}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "weather"}},
        max_tokens=100,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.parsed_arguments == Weather(city="Lima", days=2)
    assert r.choices[0].finish_reason == "tool_calls"


def test_stream_chunks_match_schema(http, fakes):
    from splitserve.gateway.protocol import ChatCompletionStreamResponse

    prompt = say(fakes, TWO_CALLS)
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "tools": TOOLS,
        "tool_choice": "required",
        "stream": True,
        "logprobs": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(http.post(CHAT, json=body).text)
    for event in events:
        ChatCompletionStreamResponse.model_validate(event)
    assert events[-1]["usage"]["completion_tokens"] == len(TWO_CALLS.encode())
    assert sum(len(e["choices"][0]["logprobs"]["content"]) for e in events[1:-1]) == len(
        TWO_CALLS.encode()
    )
