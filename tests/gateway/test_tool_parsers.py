"""The tool_choice "auto" parsers (hermes, llama3_json, mistral) and the reasoning parsers on
realistic outputs, whole and streamed: every text is also fed cut at every character boundary,
one character at a time, and in token-sized pieces, and the folded stream must equal the full
response."""

from __future__ import annotations

import json
import re

import pytest

from splitserve.gateway.chat_output import ChoiceOutput
from splitserve.gateway.tool_parsers import TOOL_PARSERS


def full(text: str, reasoning: str | None = None, tools: str | None = None) -> dict:
    out = ChoiceOutput(reasoning, tools)
    out.feed(text, final=True)
    message = out.message()
    return {
        "reasoning": message.get("reasoning"),
        "content": message["content"],
        "calls": [
            (c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]
        ],
    }


def fold(pieces: list[str], reasoning: str | None = None, tools: str | None = None) -> dict:
    """Feed `pieces` as a stream and fold the deltas the way OpenAI clients do."""
    out = ChoiceOutput(reasoning, tools)
    text = {"reasoning": "", "reasoning_content": "", "content": ""}
    calls: dict[int, list] = {}
    for k, piece in enumerate(pieces):
        delta = out.feed(piece, final=k == len(pieces) - 1)
        for key in text:
            text[key] += delta.get(key, "")
        for d in delta.get("tool_calls", []):
            fn = d["function"]
            if "id" in d:
                # The first delta of a call: index, id, type and name (then arguments only).
                assert d["index"] == len(calls) and d["type"] == "function" and d["id"]
                calls[d["index"]] = [fn["name"], fn["arguments"]]
            else:
                assert set(d) == {"index", "function"} and set(fn) == {"arguments"}
                calls[d["index"]][1] += fn["arguments"]
    assert text["reasoning"] == text["reasoning_content"]
    return {
        "reasoning": text["reasoning"] or None,
        "content": text["content"],
        "calls": [tuple(calls[i]) for i in sorted(calls)],
    }


def token_pieces(text: str) -> list[str]:
    """Token-like pieces: words with their leading space, runs of punctuation, single others."""
    return re.findall(r" ?\w+|\s+|[^\w\s]{1,3}", text)


def assert_stream_equals_full(text: str, reasoning: str | None = None, tools: str | None = None):
    expected = full(text, reasoning, tools)
    if reasoning is not None:
        want = dict(expected)
    else:
        want = {**expected, "reasoning": None}
    want["content"] = want["content"] or ""  # the stream's first chunk carries content ""
    cuts = [[text[:k], text[k:]] for k in range(len(text) + 1)]
    for pieces in [*cuts, list(text), token_pieces(text), [text]]:
        assert fold(pieces, reasoning, tools) == want, pieces
    return expected


# ----------------------------------------------------------------------------- hermes

QWEN_TWO_CALLS = (
    "I'll look both up.\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\"", "unit": "C"}}\n'
    "</tool_call>\n"
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)

HERMES_CASES = [
    # (text, content, calls)
    ("Paris is sunny today.\n", "Paris is sunny today.\n", []),
    ("x < y and <tool or <tool_ca are not calls", "x < y and <tool or <tool_ca are not calls", []),
    (
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        None,
        [("get_time", "{}")],
    ),
    (
        QWEN_TWO_CALLS,
        "I'll look both up.",
        [("get_weather", '{"city": "Paris, \\"FR\\"", "unit": "C"}'), ("get_time", "{}")],
    ),
    (
        'Sure.<tool_call>{"name":"f","arguments":{"a":[1,{"b":"}"}]}}</tool_call> Done.',
        "Sure. Done.",
        [("f", '{"a":[1,{"b":"}"}]}')],
    ),
    # Keys in the other order; a closing tag inside a string argument.
    (
        '<tool_call>{"arguments": {"q": "a </tool_call> b"}, "name": "search"}</tool_call>',
        None,
        [("search", '{"q": "a </tool_call> b"}')],
    ),
    # Unicode in content and arguments, raw and escaped.
    (
        'Météo 🌦️ :\n<tool_call>\n{"name": "météo", "arguments": {"ville": "東京", '
        '"e": "\\u00e9\\ud83d\\ude00"}}\n</tool_call>',
        "Météo 🌦️ :",
        [("météo", '{"ville": "東京", "e": "\\u00e9\\ud83d\\ude00"}')],
    ),
    # No arguments key: an empty object.
    ('<tool_call>{"name": "ping"}</tool_call>', None, [("ping", "{}")]),
    # Broken before it reads as a call: the markup stays content, the rest is parsed on.
    (
        '<tool_call>{name: "f"}</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>',
        '<tool_call>{name: "f"}</tool_call>',
        [("g", "{}")],
    ),
    ('<tool_call>["f"]</tool_call>', '<tool_call>["f"]</tool_call>', []),
    (
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        [],
    ),
    (
        '<tool_call>{"name": "f", "color": "red"}</tool_call>',
        '<tool_call>{"name": "f", "color": "red"}</tool_call>',
        [],
    ),
    (
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
        [],
    ),
    # Junk after a complete call: the call stands, the junk is content.
    (
        '<tool_call>{"name": "f", "arguments": {}} oops</tool_call>',
        "oops</tool_call>",
        [("f", "{}")],
    ),
    # An opening tag and nothing after it.
    ("Let me see <tool_call>", "Let me see <tool_call>", []),
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes(text, content, calls):
    got = assert_stream_equals_full(text, tools="hermes")
    assert got["content"] == content
    assert got["calls"] == calls
    for _, arguments in got["calls"]:
        assert isinstance(json.loads(arguments), dict)


def test_arguments_stream_in_fragments_with_ids_once():
    parser = TOOL_PARSERS["hermes"]()
    deltas = []
    for ch in QWEN_TWO_CALLS:
        deltas += parser.feed(ch)[1]
    deltas += parser.feed("", final=True)[1]
    headers = [d for d in deltas if "id" in d]
    assert [d["index"] for d in headers] == [0, 1]
    assert headers[0]["id"] != headers[1]["id"] and headers[0]["id"].startswith("chatcmpl-tool-")
    # The weather call's arguments arrive over many deltas, before its closing tag.
    assert sum(1 for d in deltas if d["index"] == 0 and "id" not in d) > 10
    assert [c["id"] for c in parser.tool_calls()] == [d["id"] for d in headers]


def test_broken_after_the_call_was_streamed():
    """Bad JSON inside arguments is found only at their end: the full response keeps the markup
    as content; a stream has already sent the call (as vLLM does) and never fails."""
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call> after'
    assert full(text, tools="hermes") == {"reasoning": None, "content": text, "calls": []}
    streamed = fold(list(text), tools="hermes")
    assert streamed["calls"][0][0] == "f"
    assert streamed["content"].startswith("Hi") and streamed["content"].endswith("after")


def test_cut_off_call_is_content_in_full():
    text = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Pa'
    assert full(text, tools="hermes")["content"] == text
    streamed = fold(list(text), tools="hermes")  # a stream shows the call as far as it went
    assert streamed["calls"] == [("get_weather", '{"city": "Pa')]


# ----------------------------------------------------------------------------- llama3_json

LLAMA_CASES = [
    (
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        None,
        [("get_weather", '{"city": "Oslo"}')],
    ),
    (
        '<|python_tag|>{"name": "a", "parameters": {"x": [1, 2]}}; {"name": "b", "parameters": {}}',
        None,
        [("a", '{"x": [1, 2]}'), ("b", "{}")],
    ),
    ('\n {"name": "a", "arguments": {"k": "ü"}}\n', None, [("a", '{"k": "ü"}')]),
    ("The weather in Oslo is mild.", "The weather in Oslo is mild.", []),
    ('{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ('Here: {"name": "a", "parameters": {}}', 'Here: {"name": "a", "parameters": {}}', []),
    # A broken second call: the first stands, the rest is content.
    ('{"name": "a", "parameters": {}}; nonsense', " nonsense", [("a", "{}")]),
    ('{"name": "a", "parameters": {}} and more', "and more", [("a", "{}")]),
]


@pytest.mark.parametrize("text,content,calls", LLAMA_CASES)
def test_llama3_json(text, content, calls):
    got = assert_stream_equals_full(text, tools="llama3_json")
    assert (got["content"], got["calls"]) == (content, calls)


# ----------------------------------------------------------------------------- mistral

MISTRAL_CASES = [
    (
        'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
        "Sure.",
        [("a", '{"x": 1}'), ("b", "{}")],
    ),
    ("No tools needed [TOOL", "No tools needed [TOOL", []),
    ('[TOOL_CALLS] {"name": "a"}', '[TOOL_CALLS] {"name": "a"}', []),
]


@pytest.mark.parametrize("text,content,calls", MISTRAL_CASES)
def test_mistral(text, content, calls):
    got = assert_stream_equals_full(text, tools="mistral")
    assert (got["content"], got["calls"]) == (content, calls)


def test_mistral_ids_are_nine_alphanumerics():
    parser = TOOL_PARSERS["mistral"]()
    parser.feed(MISTRAL_CASES[0][0], final=True)
    ids = [c["id"] for c in parser.tool_calls()]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and ids[0] != ids[1]


# ----------------------------------------------------------------------------- reasoning

REASONING_CASES = [
    # (parser, text, reasoning, content)
    (
        "deepseek_r1",
        "First, 2+2.\nIt is 4.\n</think>\n\nThe answer is 4.",
        "First, 2+2.\nIt is 4.\n",
        "\n\nThe answer is 4.",
    ),
    ("deepseek_r1", "<think>\nhmm</think>ok", "\nhmm", "ok"),
    ("deepseek_r1", "still thinking, cut by max_tokens", "still thinking, cut by max_tokens", None),
    ("deepseek_r1", "a < b </thin k></think>", "a < b </thin k>", None),
    (
        "qwen3",
        "<think>\nThe user greets.\n</think>\n\nHello! 👋",
        "\nThe user greets.\n",
        "\n\nHello! 👋",
    ),
    # Thinking turned off in the template: an empty think block (kept as is, as vLLM does).
    ("qwen3", "<think>\n\n</think>\n\nNo thinking.", "\n\n", "\n\nNo thinking."),
    ("qwen3", "Plain answer, thinking off.", None, "Plain answer, thinking off."),
    ("qwen3", "<think> cut short", " cut short", None),
    ("qwen3", "<thinking>not the tag", None, "<thinking>not the tag"),
]


@pytest.mark.parametrize("parser,text,reasoning,content", REASONING_CASES)
def test_reasoning(parser, text, reasoning, content):
    got = assert_stream_equals_full(text, reasoning=parser)
    assert (got["reasoning"], got["content"], got["calls"]) == (reasoning, content, [])


def test_reasoning_then_tool_calls_from_the_content_only():
    text = (
        '<think>\nI could write <tool_call>{"name": "nope", "arguments": {}}</tool_call>'
        " but should check the weather.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    got = assert_stream_equals_full(text, reasoning="qwen3", tools="hermes")
    assert got["reasoning"].startswith("\nI could write <tool_call>")
    assert got["content"] is None
    assert got["calls"] == [("get_weather", '{"city": "Rome"}')]
