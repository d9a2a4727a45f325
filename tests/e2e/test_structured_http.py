"""Structured outputs from an OpenAI client through every process of `splitserve serve`:
gateway mapping -> tokenizer compile -> scheduler -> worker bitmask. Each answer is checked
by an independent matcher (re.fullmatch, jsonschema, membership), never by the backends.
"""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import openai
import pytest

from splitserve.protos import scheduler_pb2, scheduler_pb2_grpc

from .conftest import wait_for

REGEX = r"(yes|no)-[0-9]{2}"
CHOICES = ["alpha", "beta gamma", "δelta"]
# Bounded on purpose: with a single optional space between JSON tokens the random model cannot
# wander off into whitespace, so every answer ends well inside max_tokens.
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
BACKENDS = ["xgrammar", "guidance"]


def idle(server) -> None:
    def check() -> bool:
        with grpc.insecure_channel(server.scheduler_address) as ch:
            st = scheduler_pb2_grpc.SchedulerServiceStub(ch).GetStats(
                scheduler_pb2.GetStatsRequest(), timeout=5
            )
        return (
            st.num_running == 0
            and st.num_waiting == 0
            and st.num_free_blocks == (st.num_total_blocks)
        )

    wait_for(check, 30, "the scheduler to be idle with every block free")


@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_choice_and_schema_over_http(client, server, backend):
    extra = {"guided_decoding_backend": backend}
    r = client.completions.create(
        model=server.model,
        prompt="The answer:",
        max_tokens=16,
        temperature=1.0,
        seed=3,
        n=3,
        extra_body={**extra, "guided_regex": REGEX},
    )
    for c in r.choices:
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text), c.text

    c = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "pick one"}],
        max_tokens=16,
        temperature=1.0,
        seed=5,
        extra_body={"structured_outputs": {"choice": CHOICES, "backend": backend}},
    )
    assert c.choices[0].message.content in CHOICES

    pattern = {"guided_whitespace_pattern": " ?"} if backend == "guidance" else {}
    c = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "plan a trip"}],
        max_tokens=64,
        temperature=0.7,
        seed=11,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "trip", "schema": CITY_SCHEMA, "strict": True},
        },
        extra_body={**extra, **pattern},
    )
    choice = c.choices[0]
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), CITY_SCHEMA)
    else:  # cut by max_tokens: xgrammar allows any JSON whitespace, so only a prefix is owed
        assert choice.finish_reason == "length"
        assert choice.message.content.lstrip().startswith("{")
    idle(server)


def test_forced_tool_call_over_http(client, server):
    tools = [
        {
            "type": "function",
            "function": {"name": "book", "description": "book a trip", "parameters": CITY_SCHEMA},
        }
    ]
    c = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "book it"}],
        max_tokens=96,
        temperature=0.5,
        seed=2,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "book"}},
        extra_body={"guided_decoding_backend": "guidance", "guided_whitespace_pattern": " ?"},
    )
    choice = c.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "book"
    jsonschema.validate(json.loads(call.function.arguments), CITY_SCHEMA)

    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "book it"}],
            max_tokens=96,
            temperature=0.5,
            seed=2,
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "book"}},
            extra_body={"guided_decoding_backend": "guidance", "guided_whitespace_pattern": " ?"},
            stream=True,
        )
    )
    args = "".join(
        tc.function.arguments or ""
        for ch in chunks
        if ch.choices
        for tc in ch.choices[0].delta.tool_calls or []
    )
    assert args == call.function.arguments  # same seed: the stream carries the same call
    idle(server)


def test_bad_constraints_are_400_and_the_stack_stays_healthy(client, server):
    bad = [
        {"guided_regex": "(unclosed"},
        {"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
        {"guided_grammar": "root ::= missing_rule"},
        {"guided_regex": "[ab]+", "guided_choice": ["a", "b"]},
    ]
    for body in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=server.model, prompt="x", max_tokens=4, extra_body=body)
        assert err.value.status_code == 400
        assert err.value.body and err.value.body.get("message"), body
    r = client.completions.create(model=server.model, prompt="still fine", max_tokens=3)
    assert r.choices[0].text is not None
    idle(server)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_constrained_answers_equal_the_non_streamed_ones(client, server, backend):
    """Same seed, stream or not: the joined SSE deltas are the whole answer, and it holds."""
    kw = dict(
        model=server.model,
        prompt="The answer:",
        max_tokens=16,
        temperature=1.0,
        seed=9,
        n=2,
        extra_body={"guided_decoding_backend": backend, "guided_regex": REGEX},
    )
    whole = client.completions.create(**kw)
    texts, finish = ["", ""], [None, None]
    for ch in client.completions.create(**kw, stream=True):
        for c in ch.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    for c in whole.choices:
        assert texts[c.index] == c.text and finish[c.index] == c.finish_reason == "stop"
        assert re.fullmatch(REGEX, c.text), c.text

    pattern = {"guided_whitespace_pattern": " ?"} if backend == "guidance" else {}
    kw = dict(
        model=server.model,
        messages=[{"role": "user", "content": "plan a trip"}],
        max_tokens=64,
        temperature=0.7,
        seed=13,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "trip", "schema": CITY_SCHEMA, "strict": True},
        },
        extra_body={"guided_decoding_backend": backend, **pattern},
    )
    whole = client.chat.completions.create(**kw).choices[0]
    text, reason = "", None
    for ch in client.chat.completions.create(**kw, stream=True):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            reason = ch.choices[0].finish_reason or reason
    assert text == whole.message.content and reason == whole.finish_reason
    if reason == "stop":
        jsonschema.validate(json.loads(text), CITY_SCHEMA)
    else:
        assert reason == "length" and text.lstrip().startswith("{")
    idle(server)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_a_constrained_answer(client, server, stream):
    kw = dict(
        model=server.model,
        prompt="The answer:",
        max_tokens=16,
        temperature=1.0,
        seed=3,
        n=3,
        extra_body={"guided_regex": REGEX},
    )
    whole = client.completions.create(**kw)
    cut = client.completions.create(**kw, stop=["-"], stream=stream)
    texts, finish = ["", "", ""], [None, None, None]
    for c in (c for ch in cut for c in ch.choices) if stream else cut.choices:
        texts[c.index] += c.text
        finish[c.index] = c.finish_reason or finish[c.index]
    for c in whole.choices:
        assert re.fullmatch(REGEX, c.text), c.text
        assert texts[c.index] == c.text.split("-")[0] and finish[c.index] == "stop"
    idle(server)


# A tagged union (the branches differ in a required "kind" const) or null: its oneOf is
# provably disjoint, so it means its anyOf. The "s" branch's pattern has a length bound, which
# xgrammar would drop, so the default backend (auto) must pick llguidance for it.
TAGGED_ONE_OF = {
    "oneOf": [
        {
            "type": "object",
            "properties": {"kind": {"const": "n"}, "v": {"type": "integer", "maximum": 9}},
            "required": ["kind", "v"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "kind": {"const": "s"},
                "v": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3},
            },
            "required": ["kind", "v"],
            "additionalProperties": False,
        },
        {"type": "null"},
    ]
}


def test_one_of_schema_with_the_default_backend(client, server, tiny_model):
    """vLLM's default backend is auto: a oneOf schema (which the old xgrammar default refused
    with a 400) is served with no backend named, and every answer validates."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # The random model favours whitespace, which JSON allows without limit: discourage it.
    no_space = {str(t): -100 for t in range(len(tok)) if not tok.decode([t]).strip()}
    seen = set()
    for seed in range(4):
        r = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": f"one value please ({seed})"}],
            max_tokens=64,
            temperature=1.0,
            seed=seed,
            logit_bias=no_space,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "tagged", "schema": TAGGED_ONE_OF},
            },
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        value = json.loads(choice.message.content)
        jsonschema.validate(value, TAGGED_ONE_OF)
        seen.add(None if value is None else value["kind"])
    print(seen)
    idle(server)
