"""Structured outputs at the gateway (CHECKLIST row 9): every request surface maps to one
GrammarSpec that is compiled by the tokenizer service and sent on every GenerateRequest; bad
shapes and conflicts are 400s before any RPC; compile errors are 400s that name the problem,
and the engine never sees the request."""

from __future__ import annotations

import json

import pytest

from .fakes import grammar_compiled_spec
from .test_completions import tag
from .test_validation import assert_error

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
GRAMMAR = 'root ::= "yes" | "no"'


def body_for(path: str, t: str, **fields) -> dict:
    base = {"prompt": t} if path == COMPL else {"messages": [{"role": "user", "content": t}]}
    return {**base, "max_tokens": 2, **fields}


def grammar_of(fakes, t: str):
    calls = fakes.scheduler.calls_matching(t)
    assert calls, "no Generate call"
    out = []
    for c in calls:
        assert not c.request.HasField("grammar")  # the gateway sends the compiled form only
        has = c.request.HasField("compiled_grammar")
        out.append(grammar_compiled_spec(c.request.compiled_grammar) if has else None)
    return out


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


# (request fields, (kind, spec, backend, whitespace_pattern) the scheduler must receive)
SURFACES = {
    "response_format json_object": (
        {"response_format": {"type": "json_object"}},
        ("json_object", "", "", ""),
    ),
    "response_format json_schema": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": SCHEMA, "strict": True},
            }
        },
        ("json", compact(SCHEMA), "", ""),
    ),
    "structured_outputs.json": (
        {"structured_outputs": {"json": SCHEMA}},
        ("json", compact(SCHEMA), "", ""),
    ),
    "structured_outputs.json as text": (
        {"structured_outputs": {"json": json.dumps(SCHEMA)}},
        ("json", compact(SCHEMA), "", ""),
    ),
    "structured_outputs.regex": (
        {"structured_outputs": {"regex": "[a-z]+@[a-z]+"}},
        ("regex", "[a-z]+@[a-z]+", "", ""),
    ),
    "structured_outputs.choice": (
        {"structured_outputs": {"choice": ["yes", "no"]}},
        ("choice", '["yes", "no"]', "", ""),
    ),
    "structured_outputs.grammar": (
        {"structured_outputs": {"grammar": GRAMMAR}},
        ("grammar", GRAMMAR, "", ""),
    ),
    "structured_outputs.json_object": (
        {"structured_outputs": {"json_object": True}},
        ("json_object", "", "", ""),
    ),
    "structured_outputs modifiers": (
        {"structured_outputs": {"json": SCHEMA, "backend": "guidance", "whitespace_pattern": " ?"}},
        ("json", compact(SCHEMA), "guidance", " ?"),
    ),
    "structured_outputs.disable_additional_properties": (
        {
            "structured_outputs": {
                "json": {"type": "object", "properties": {"a": {"type": "object"}}},
                "disable_additional_properties": True,
            }
        },
        (
            "json",
            compact(
                {
                    "type": "object",
                    "properties": {"a": {"type": "object", "additionalProperties": False}},
                    "additionalProperties": False,
                }
            ),
            "",
            "",
        ),
    ),
    "guided_json": ({"guided_json": SCHEMA}, ("json", compact(SCHEMA), "", "")),
    "guided_json as text": (
        {"guided_json": json.dumps(SCHEMA)},
        ("json", compact(SCHEMA), "", ""),
    ),
    "guided_regex": ({"guided_regex": r"\d{3}"}, ("regex", r"\d{3}", "", "")),
    "guided_choice": ({"guided_choice": ["a", "b c"]}, ("choice", '["a", "b c"]', "", "")),
    "guided_grammar": ({"guided_grammar": GRAMMAR}, ("grammar", GRAMMAR, "", "")),
    "guided_* modifiers": (
        {
            "guided_json": SCHEMA,
            "guided_decoding_backend": "llguidance",
            "guided_whitespace_pattern": "[ \\n]*",
        },
        ("json", compact(SCHEMA), "guidance", "[ \\n]*"),
    ),
    "backend on response_format": (
        {"response_format": {"type": "json_object"}, "guided_decoding_backend": "auto"},
        ("json_object", "", "auto", ""),
    ),
}


@pytest.mark.parametrize("path", [CHAT, COMPL])
@pytest.mark.parametrize("surface", list(SURFACES))
def test_surface_maps_to_one_grammar(http, fakes, path, surface):
    fields, (kind, spec, backend, whitespace) = SURFACES[surface]
    t = tag()
    r = http.post(path, json=body_for(path, t, **fields))
    assert r.status_code == 200, r.text
    (grammar,) = grammar_of(fakes, t)
    assert grammar is not None
    assert (grammar.kind, grammar.spec, grammar.backend, grammar.whitespace_pattern) == (
        kind,
        spec,
        backend,
        whitespace,
    )
    # The gateway compiled exactly that constraint in the request's Prepare call.
    last = fakes.tokenizer.compile_calls[-1]
    assert last.grammar == grammar


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [CHAT, COMPL])
def test_one_tokenizer_call_per_request(http, fakes, path, stream):
    """Template or tokens, bad words and the constraint: one Prepare call, nothing else; the
    compiled constraint and the bad words' ids travel to the scheduler with the request."""
    t = tag()
    fields = {
        "bad_words": ["fox", "dog"],
        "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        "stream": stream,
    }
    if path == COMPL:  # a batch of a text and an id prompt, echoed
        fields.update(prompt=[t, [65, 66, 67]], echo=True)
    before = len(fakes.tokenizer.rpcs)
    r = http.post(path, json=body_for(path, t, **fields))
    assert r.status_code == 200, r.text
    assert fakes.tokenizer.rpcs[before:] == ["Prepare"]
    (call,) = fakes.tokenizer.prepare_calls[-1:]
    assert list(call.bad_words) == ["fox", "dog"] and call.grammar.kind == "json"
    generated = fakes.scheduler.calls_matching(t)
    assert generated and [grammar_compiled_spec(c.request.compiled_grammar) for c in generated]
    for c in generated:
        assert grammar_compiled_spec(c.request.compiled_grammar) == call.grammar
        banned = [list(s.token_ids) for s in c.request.sampling_params.bad_words_token_ids]
        assert banned == [list(b"fox"), list(b" fox"), list(b"dog"), list(b" dog")]
    if path == COMPL and not stream:
        texts = [c["text"] for c in r.json()["choices"]]
        assert texts[0].startswith(t) and texts[1].startswith("ABC")  # echo: decoded ids


@pytest.mark.parametrize("path", [CHAT, COMPL])
def test_no_constraint_sends_no_grammar(http, fakes, path):
    before = len(fakes.tokenizer.compile_calls)
    t = tag()
    fields = {"response_format": {"type": "text"}, "structured_outputs": {"json_object": False}}
    r = http.post(path, json=body_for(path, t, **fields))
    assert r.status_code == 200, r.text
    assert grammar_of(fakes, t) == [None]
    assert len(fakes.tokenizer.compile_calls) == before


def test_every_sequence_carries_the_grammar(http, fakes):
    t = tag()
    r = http.post(COMPL, json={"prompt": [t, t + "!"], "n": 3, "guided_choice": ["x"]})
    assert r.status_code == 200, r.text
    grammars = grammar_of(fakes, t)
    assert len(grammars) == 6
    assert all(g is not None and g.kind == "choice" and g.spec == '["x"]' for g in grammars)
    t = tag()
    r = http.post(CHAT, json=body_for(CHAT, t, n=2, guided_regex="a+", stream=True))
    assert r.status_code == 200
    assert [g.spec for g in grammar_of(fakes, t)] == ["a+", "a+"]


def test_constrained_text_and_grammar_stop(http, fakes):
    """A grammar that terminates ends the sequence with STOP: finish_reason "stop"."""
    fakes.scheduler.say["yes"] = "yes"
    t = tag()
    r = http.post(
        COMPL, json={"prompt": f"#say=yes {t}", "max_tokens": 10, "guided_grammar": GRAMMAR}
    )
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("yes", "stop", None)


# ----------------------------------------------------------------------------- refusals


@pytest.fixture
def untouched(fakes):
    """The request must fail before any compile or Generate call."""
    compiles = len(fakes.tokenizer.compile_calls)
    generates = len(fakes.scheduler.calls)
    yield
    assert len(fakes.tokenizer.compile_calls) == compiles
    assert len(fakes.scheduler.calls) == generates


CONFLICTS = [
    (
        {"response_format": {"type": "json_object"}, "guided_regex": "a"},
        "response_format",
        ["response_format json_object", "guided_regex"],
    ),
    (
        {"structured_outputs": {"json": SCHEMA, "regex": "a"}},
        "structured_outputs",
        ["structured_outputs.json", "structured_outputs.regex"],
    ),
    (
        {"guided_json": SCHEMA, "guided_choice": ["a"]},
        "guided_json",
        ["guided_json", "guided_choice"],
    ),
    (
        {"structured_outputs": {"choice": ["a"]}, "guided_grammar": GRAMMAR},
        "structured_outputs",
        ["structured_outputs.choice", "guided_grammar"],
    ),
]


@pytest.mark.parametrize("path", [CHAT, COMPL])
@pytest.mark.parametrize("fields,param,names", CONFLICTS)
def test_two_constraints_are_400(http, untouched, path, fields, param, names):
    err = assert_error(http.post(path, json=body_for(path, tag(), **fields)), 400, param)
    for name in names:
        assert name in err["message"]


BAD_SHAPES = [
    ({"guided_choice": []}, "guided_choice", "at least one"),
    ({"guided_choice": "yes"}, "guided_choice", "list of strings"),
    ({"guided_choice": ["a", 1]}, "guided_choice", "list of strings"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "at least one"),
    ({"guided_json": 5}, "guided_json", "object or a boolean"),
    ({"guided_json": [1]}, "guided_json", "object or a boolean"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"structured_outputs": {"json": "[]"}}, "structured_outputs", "object or a boolean"),
    ({"guided_regex": ""}, "guided_regex", "must not be empty"),
    ({"guided_regex": 3}, "guided_regex", "must be a string"),
    ({"guided_grammar": ""}, "guided_grammar", "must not be empty"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format",
        "schema is missing",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
        "response_format",
        "object or a boolean",
    ),
    ({"response_format": {"type": "xml"}}, "response_format", "'xml'"),
    ({"structured_outputs": "json"}, "structured_outputs", "must be an object"),
    ({"structured_outputs": {"jsonn": SCHEMA}}, "structured_outputs", "'jsonn'"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs", "boolean"),
    (
        {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
        "structured_outputs",
        "whitespace_pattern",
    ),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag"),
    (
        {"structured_outputs": {"regex": "a", "disable_additional_properties": True}},
        "structured_outputs",
        "JSON schema only",
    ),
    (
        {"structured_outputs": {"json": SCHEMA, "disable_fallback": True}},
        "structured_outputs",
        "named backend",
    ),
    (
        {"guided_json": SCHEMA, "guided_decoding_backend": "outlines"},
        "guided_decoding_backend",
        "xgrammar",
    ),
    (
        {
            "guided_json": SCHEMA,
            "guided_decoding_backend": "xgrammar",
            "structured_outputs": {"backend": "guidance"},
        },
        "guided_decoding_backend",
        "disagree",
    ),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "without a constraint"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "without a JSON constraint"),
    ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "JSON"),
    (
        {"guided_json": SCHEMA, "guided_whitespace_pattern": ""},
        "guided_whitespace_pattern",
        "empty",
    ),
]


@pytest.mark.parametrize("fields,param,words", BAD_SHAPES)
def test_bad_shapes_are_400_before_any_rpc(http, untouched, fields, param, words):
    err = assert_error(http.post(COMPL, json=body_for(COMPL, tag(), **fields)), 400, param)
    assert words in err["message"], err


def test_bad_shape_on_chat_too(http, untouched):
    r = http.post(CHAT, json=body_for(CHAT, tag(), guided_choice=[]))
    assert_error(r, 400, "guided_choice")


COMPILE_ERRORS = [
    ({"guided_regex": "(unclosed"}, "guided_regex", "invalid regex"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"oneOf": [{}]}}}},
        "response_format",
        "oneOf",
    ),
    ({"structured_outputs": {"grammar": "start ::= 'a'"}}, "structured_outputs", "root"),
    ({"guided_regex": "#compile-timeout"}, "guided_regex", "too long to compile"),
]


@pytest.mark.parametrize("path", [CHAT, COMPL])
@pytest.mark.parametrize("fields,param,words", COMPILE_ERRORS)
def test_compile_errors_are_400_and_engine_untouched(http, fakes, path, fields, param, words):
    before = len(fakes.tokenizer.compile_calls)
    t = tag()
    err = assert_error(http.post(path, json=body_for(path, t, **fields)), 400, param)
    assert words in err["message"], err
    assert len(fakes.tokenizer.compile_calls) == before + 1
    assert fakes.scheduler.calls_matching(t) == []


def test_full_compile_pool_is_503_with_retry_after(http, fakes):
    t = tag()
    r = http.post(COMPL, json=body_for(COMPL, t, guided_regex="#compile-busy"))
    assert_error(r, 503)
    assert r.headers["retry-after"] == "1"
    assert "compile pool" in r.json()["error"]["message"]
    assert fakes.scheduler.calls_matching(t) == []


def test_gateway_deadline_during_compile_is_504(make_gateway, fakes):
    """The request's own deadline running out while compiling is a timeout (504), not the
    compiler's verdict on the constraint (400)."""
    gw = make_gateway(request_timeout_s=0.3)
    t = tag()
    with gw.client() as c:
        r = c.post(COMPL, json=body_for(COMPL, t, guided_regex="#compile-hang"))
    assert_error(r, 504)
    assert fakes.scheduler.calls_matching(t) == []


def test_token_id_prompts_with_nothing_to_prepare_skip_the_tokenizer(http, fakes):
    """Token ids, no bad words, constraint, echo or truncation: zero tokenizer calls, and the
    ids reach the scheduler as given."""
    before_rpcs, before_calls = len(fakes.tokenizer.rpcs), set(fakes.scheduler.calls)
    ids = [65, 66, 67, 68]
    r = http.post(COMPL, json={"prompt": ids, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert fakes.tokenizer.rpcs[before_rpcs:] == []
    (new,) = [c for key, c in fakes.scheduler.calls.items() if key not in before_calls]
    assert list(new.request.prompt_token_ids) == ids
    # With echo the prompt's text is needed: one Prepare call again.
    r = http.post(COMPL, json={"prompt": ids, "max_tokens": 3, "echo": True})
    assert r.status_code == 200, r.text
    assert fakes.tokenizer.rpcs[before_rpcs:] == ["Prepare"]
