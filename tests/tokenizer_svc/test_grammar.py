"""Constraint compile: every kind on both backends, refusals that name the problem, the cache,
the pool's timeout and bound, and the constraint part of the Prepare RPC.

Compiled grammars are checked by running the sampling rank's own matcher
(`worker.structured_output`) over the tokens of texts that must be accepted or rejected.
"""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2

from splitserve.protos import common_pb2
from splitserve.protos import tokenizer_pb2 as pb
from splitserve.tokenizer_svc import grammar as gm
from splitserve.tokenizer_svc.config import TokenizerServiceConfig
from splitserve.tokenizer_svc.prepare import PART_METADATA_KEY

from .test_server import ServerThread

EXTRA_VOCAB = 24  # the model's embedding has more rows than the tokenizer has tokens
STOP_IDS = [1, 4]


@pytest.fixture(scope="module")
def model_dir(chatml_dir, tmp_path_factory):
    """A tokenizer folder with a config.json, as a model folder has."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("grammar_model")
    shutil.copytree(chatml_dir, out, dirs_exist_ok=True)
    n = len(AutoTokenizer.from_pretrained(out))
    (out / "config.json").write_text(json.dumps({"vocab_size": n + EXTRA_VOCAB, "eos_token_id": 1}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": STOP_IDS}))
    return out


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def gtok(model_dir, hf_tok):
    return gm.GrammarTokenizer(
        hf_tok,
        gm.grammar_vocab_size(model_dir, len(hf_tok)),
        gm.grammar_stop_ids(model_dir, hf_tok),
    )


@pytest.fixture(scope="module")
def compiler(gtok):
    return gm.GrammarCompiler(gtok, cache_size=64)


@pytest.fixture(scope="module")
def structured(hf_tok, gtok):
    from splitserve.worker.structured_output import StructuredOutputs

    return StructuredOutputs(lambda: hf_tok, gtok.vocab_size, STOP_IDS)


def spec(kind, text="", backend="", ws=""):
    return common_pb2.GrammarSpec(kind=kind, spec=text, backend=backend, whitespace_pattern=ws)


def status(structured, hf_tok, compiled, text: str) -> str:
    """'complete' (the grammar may end after text), 'prefix' or 'rejected'."""
    ids = hf_tok.encode(text, add_special_tokens=False)
    if structured.add("probe", compiled, ids) is not None:
        return "rejected"
    try:
        bitmask, failed = structured.fill(["probe"], [0])
        assert not failed
        words = bitmask[0].tolist()
        return "complete" if any(words[t // 32] >> (t % 32) & 1 for t in STOP_IDS) else "prefix"
    finally:
        structured.remove("probe")


def test_vocab_and_stop_ids_come_from_the_model_folder(gtok, hf_tok):
    assert gtok.vocab_size == len(hf_tok) + EXTRA_VOCAB
    assert gtok.stop_token_ids == STOP_IDS


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "tag": {"enum": ["a", "b"]},
    },
    "required": ["name", "n", "tag"],
    "additionalProperties": False,
}

# kind, constraint, complete texts, prefixes, rejected texts
CASES = {
    "json": (
        json.dumps(SCHEMA),
        ['{"name": "bob", "n": 3, "tag": "a"}', '{"name":"","n":9,"tag":"b"}'],
        ['{"name": "bo', '{"name": "x", "n": 3'],
        ['{"name": "toolong", "n": 3, "tag": "a"}', '{"name": "b", "n": 10, "tag": "a"}', "[]"],
    ),
    "json_object": ("", ['{"x": [1, {"y": null}]}', "{}"], ['{"x": '], ["[1]", "3", '"s"']),
    "regex": (r"[a-c]{2,3}-\d", ["ab-1", "abc-9"], ["ab", "abc-"], ["a-1", "abcd-1", "ab-x"]),
    "choice": (
        json.dumps(["yes", "no way", 'say "hi" 🙂']),
        ["yes", "no way", 'say "hi" 🙂'],
        ["ye", "no "],
        ["yes!", "nope", "maybe"],
    ),
}
EBNF = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9]+'
LARK = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]+/'
GRAMMAR_TEXTS = (["(1)", "(12+3+45)"], ["(1+", "(7"], ["()", "(1+)", "1+2"])


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
@pytest.mark.parametrize("kind", [*CASES, "grammar"])
def test_each_kind_on_both_backends(compiler, structured, hf_tok, backend, kind):
    if kind == "grammar":
        text = EBNF if backend == "xgrammar" else LARK
        complete, prefixes, rejected = GRAMMAR_TEXTS
    else:
        text, complete, prefixes, rejected = CASES[kind]
    result = compiler.compile_sync(spec(kind, text, backend))
    compiled = result.grammar
    assert compiled.backend == backend
    assert compiled.handle == gm.grammar_handle(backend, kind, text, "")
    for t in complete:
        assert status(structured, hf_tok, compiled, t) == "complete", t
    for t in prefixes:
        assert status(structured, hf_tok, compiled, t) == "prefix", t
    for t in rejected:
        assert status(structured, hf_tok, compiled, t) == "rejected", t


def test_guidance_takes_gbnf_too(compiler, structured, hf_tok):
    compiled = compiler.compile_sync(spec("grammar", EBNF, "guidance")).grammar
    assert status(structured, hf_tok, compiled, "(1+2)") == "complete"
    assert status(structured, hf_tok, compiled, "(+") == "rejected"


@pytest.mark.parametrize(
    "kind, text, backend, match",
    [
        ("json", "{not json", "xgrammar", "not valid JSON"),
        ("json", "{not json", "guidance", "not valid JSON"),
        ("json", "[1, 2]", "auto", "must be an object or a boolean"),
        ("regex", "(ab", "xgrammar", "parenthesis is not closed"),
        ("regex", "(ab", "guidance", "unclosed group"),
        ("grammar", "root ::= undefined_rule", "xgrammar", "undefined_rule"),
        ("grammar", "start: ( ", "guidance", "Expected token"),
        ("choice", "[]", "xgrammar", "non-empty JSON array"),
        ("choice", '["a", 3]', "guidance", "non-empty JSON array"),
        ("choice", "yes", "auto", "JSON array of strings"),
        ("regex", "", "xgrammar", "the regex constraint is empty"),
        ("xml", "<a/>", "xgrammar", "unknown constraint kind 'xml'"),
        ("regex", "a", "outlines", "unknown guided decoding backend 'outlines'"),
    ],
)
def test_invalid_constraints_are_refused_with_the_reason(compiler, kind, text, backend, match):
    with pytest.raises(gm.GrammarError, match=match) as info:
        compiler.compile_sync(spec(kind, text, backend))
    assert info.value.status == "INVALID_ARGUMENT"


OVERLAPPING_ONE_OF = {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}
DISJOINT_ONE_OF = {"oneOf": [{"type": "integer"}, {"type": "string"}]}


@pytest.mark.parametrize(
    "schema, feature",
    [
        (OVERLAPPING_ONE_OF, "'oneOf' with 2 branches not provably disjoint"),
        ({"not": {"type": "integer"}}, "'not'"),
        ({"allOf": [{"minimum": 1}, {"maximum": 3}]}, "'allOf' with 2 schemas"),
        ({"if": {"type": "integer"}, "then": {"minimum": 3}}, "'if'"),
        ({"type": "string", "format": "idn-email"}, "string format 'idn-email'"),
        ({"type": "number", "multipleOf": 0.5}, "'multipleOf'"),
        ({"$ref": "http://example.com/s.json"}, "a '\\$ref' outside the schema"),
        ({"type": "object", "required": ["z"]}, "'required' naming 'z'"),
        ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
        (
            {"type": "object", "properties": {"a": {"dependentSchemas": {}}}},
            "'dependentSchemas' at #/properties/a/dependentSchemas",
        ),
        # xgrammar 0.2.8 warns and drops the second keyword of each of these pairs.
        ({"type": "integer", "minimum": 0, "multipleOf": 2}, "'multipleOf' together with"),
        ({"type": "string", "pattern": "a+", "maxLength": 3}, "'pattern' together with"),
        ({"type": "string", "format": "email", "minLength": 9}, "'format' together with"),
        ({"type": "string", "pattern": "a^b"}, "'pattern' with '\\^' in the middle"),
    ],
)
def test_xgrammar_refuses_what_it_would_only_approximate(compiler, schema, feature):
    with pytest.raises(gm.GrammarError, match=f"xgrammar does not enforce JSON-schema {feature}"):
        compiler.compile_sync(spec("json", json.dumps(schema), "xgrammar"))


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
@pytest.mark.parametrize("schema", [{"type": "string"}, {"type": "string", "maxLength": 4}])
def test_raw_control_characters_never_enter_a_json_string(
    compiler, structured, hf_tok, backend, schema
):
    """xgrammar's own length-limited string lets U+0011 through; ours must not."""
    compiled = compiler.compile_sync(spec("json", json.dumps(schema), backend)).grammar
    assert status(structured, hf_tok, compiled, '"ab"') == "complete"
    assert status(structured, hf_tok, compiled, '"a\x11') == "rejected"
    assert status(structured, hf_tok, compiled, '"a\tb"') == "rejected"


def test_xgrammar_ignores_unknown_keywords_as_validators_do(compiler):
    schema = {"type": "integer", "x-kind": "count", "self": {"vendor": "v"}, "title": "t"}
    assert compiler.compile_sync(spec("json", json.dumps(schema), "xgrammar")).grammar.compiled


@pytest.mark.parametrize(
    "regex, feature",
    [("ab(?=c)", "a lookahead assertion"), ("a^b", "'\\^' in the middle"), ("a$b+", "'\\$' in")],
)
def test_xgrammar_refuses_a_regex_it_would_only_approximate(compiler, regex, feature):
    with pytest.raises(gm.GrammarError, match=f"xgrammar does not enforce a regex with {feature}"):
        compiler.compile_sync(spec("regex", regex, "xgrammar"))


@pytest.mark.parametrize(
    "regex, ok",
    [(r"^ab$", None), (r"[^$]+\$\^", None), (r"[]^]x", None), (r"(?:a|b)$", None)],
)
def test_anchors_at_the_ends_and_escaped_or_in_classes_are_fine(regex, ok):
    assert gm.xgrammar_regex_departure(regex) is ok


def test_xgrammar_really_drops_a_range_multipleof(gtok):
    """The pair refusals are not folklore either: compiled as-is, xgrammar accepts 3 for
    {minimum 0, multipleOf 2}, a value the schema forbids."""
    import xgrammar

    schema = {"type": "integer", "minimum": 0, "multipleOf": 2}
    compiled = gm.xgrammar_compiler(gtok).compile_json_schema(json.dumps(schema))
    matcher = xgrammar.GrammarMatcher(compiled)
    assert matcher.accept_string("3")


def test_the_backends_really_disagree_where_xgrammar_is_refused(gtok):
    """The refusal list is not folklore: xgrammar compiled as-is lets a value break oneOf."""
    import xgrammar

    compiled = gm.xgrammar_compiler(gtok).compile_json_schema(json.dumps(OVERLAPPING_ONE_OF))
    matcher = xgrammar.GrammarMatcher(compiled)
    assert matcher.accept_string("5")  # valid for both branches: oneOf must reject it


def test_auto_sends_a_schema_to_the_backend_that_enforces_it(compiler, structured, hf_tok):
    # xgrammar drops a pattern's length bound; llguidance keeps it.
    bounded = {"type": "string", "pattern": "a+", "maxLength": 3}
    compiled = compiler.compile_sync(spec("json", json.dumps(bounded), "auto")).grammar
    assert compiled.backend == "guidance"
    assert status(structured, hf_tok, compiled, '"aaa"') == "complete"
    assert status(structured, hf_tok, compiled, '"aaaa') == "rejected"
    plain = compiler.compile_sync(spec("json", json.dumps(SCHEMA), "auto")).grammar
    assert plain.backend == "xgrammar"


def test_auto_sends_all_of_to_llguidance_which_keeps_every_part(compiler, structured, hf_tok):
    schema = {"allOf": [{"type": "integer", "minimum": 10}, {"type": "integer", "maximum": 20}]}
    compiled = compiler.compile_sync(spec("json", json.dumps(schema), "auto")).grammar
    assert compiled.backend == "guidance"
    assert status(structured, hf_tok, compiled, "15") == "complete"
    assert status(structured, hf_tok, compiled, "25") == "rejected"  # breaks the second part
    assert status(structured, hf_tok, compiled, "5") == "rejected"  # breaks the first


def test_dependencies_and_not_required_reach_llguidance_rewritten(compiler, structured, hf_tok):
    """Neither backend has `dependencies` or `not`; the rewrite llguidance gets is exact."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "dependencies": {"a": ["b"]},
        "not": {"required": ["b"]},
    }
    compiled = compiler.compile_sync(spec("json", json.dumps(schema), "auto")).grammar
    assert compiled.backend == "guidance"
    assert status(structured, hf_tok, compiled, "{}") == "complete"
    assert status(structured, hf_tok, compiled, '{"a": 1}') == "rejected"  # needs b
    assert status(structured, hf_tok, compiled, '{"b": 2}') == "rejected"  # b is forbidden


def test_a_provably_disjoint_one_of_is_enforced_by_xgrammar(compiler, structured, hf_tok):
    compiled = compiler.compile_sync(spec("json", json.dumps(DISJOINT_ONE_OF), "auto")).grammar
    assert compiled.backend == "xgrammar"
    assert status(structured, hf_tok, compiled, "12") == "complete"
    assert status(structured, hf_tok, compiled, '"s"') == "complete"
    assert status(structured, hf_tok, compiled, "null") == "rejected"


def test_llguidance_reads_a_disjoint_one_of_as_any_of(compiler, structured, hf_tok):
    """llguidance refuses oneOf unless told to read it as anyOf; told only when exact."""
    schema = {"oneOf": [{"type": "string", "pattern": "a+", "maxLength": 2}, {"type": "null"}]}
    compiled = compiler.compile_sync(spec("json", json.dumps(schema), "auto")).grammar
    assert compiled.backend == "guidance"
    assert json.loads(compiled.compiled)["grammars"][0]["json_schema"]["x-guidance"] == {
        "coerce_one_of": True
    }
    assert status(structured, hf_tok, compiled, '"aa"') == "complete"
    assert status(structured, hf_tok, compiled, "null") == "complete"
    assert status(structured, hf_tok, compiled, '"aaa') == "rejected"
    assert status(structured, hf_tok, compiled, "1") == "rejected"


def test_a_schema_cannot_loosen_llguidance_with_its_own_options(compiler):
    schema = {"oneOf": [{"type": "integer"}, {}], "x-guidance": {"coerce_one_of": True}}
    with pytest.raises(gm.GrammarError, match="may not carry llguidance's 'x-guidance'"):
        compiler.compile_sync(spec("json", json.dumps(schema), "guidance"))


def test_auto_refuses_what_no_backend_enforces(compiler):
    with pytest.raises(gm.GrammarError, match="no backend can enforce") as info:
        compiler.compile_sync(spec("json", json.dumps(OVERLAPPING_ONE_OF), "auto"))
    assert "oneOf" in info.value.message and "coerce_one_of" in info.value.message


def test_whitespace_pattern(compiler, structured, hf_tok):
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    with pytest.raises(gm.GrammarError, match="xgrammar cannot take a whitespace_pattern"):
        compiler.compile_sync(spec("json", schema, "xgrammar", ws=" ?"))
    compiled = compiler.compile_sync(spec("json", schema, "auto", ws=" ?")).grammar
    assert compiled.backend == "guidance"
    assert status(structured, hf_tok, compiled, '{"a": 1}') == "complete"
    assert status(structured, hf_tok, compiled, '{\n"a": 1}') == "rejected"


def test_cache_hits_and_lru_eviction(gtok):
    compiler = gm.GrammarCompiler(gtok, cache_size=2)
    first = compiler.compile_sync(spec("regex", "a+"))
    again = compiler.compile_sync(spec("regex", "a+"))
    assert not first.cache_hit and again.cache_hit and again.seconds == 0
    assert again.grammar == first.grammar and first.grammar.backend == "xgrammar"
    other = compiler.compile_sync(spec("regex", "a+", "guidance"))
    assert not other.cache_hit and other.grammar.handle != first.grammar.handle
    compiler.compile_sync(spec("regex", "b+"))  # third entry evicts the oldest
    assert compiler.lookup(first.grammar.handle) is None
    assert compiler.lookup(other.grammar.handle) is not None


def test_default_backend_is_the_configured_one(gtok):
    compiler = gm.GrammarCompiler(gtok, default_backend="guidance")
    result = compiler.compile_sync(spec("regex", "a+"))
    assert result.grammar.backend == "guidance"
    assert result.grammar.handle == gm.grammar_handle("guidance", "regex", "a+", "")


def test_compile_timeout_and_bounded_pool(gtok, monkeypatch):
    release = threading.Event()
    started = threading.Event()
    real = gm.GrammarCompiler.compile_sync

    def slow(self, s):
        started.set()
        release.wait(30)
        return real(self, s)

    monkeypatch.setattr(gm.GrammarCompiler, "compile_sync", slow)
    compiler = gm.GrammarCompiler(gtok, timeout_s=0.05, threads=1, max_pending=1)

    async def run():
        with pytest.raises(gm.CompileTimeout, match="longer than 0.05 s") as info:
            await compiler.compile(spec("regex", "a+"))
        assert info.value.status == "DEADLINE_EXCEEDED"
        assert started.is_set()
        # The timed-out compile still runs and holds the only slot.
        with pytest.raises(gm.CompilePoolFull) as full:
            await compiler.compile(spec("regex", "b+"))
        assert full.value.status == "RESOURCE_EXHAUSTED"
        release.set()
        for _ in range(500):  # the slot frees when the thread finishes
            if compiler._pending == 0:
                break
            await asyncio.sleep(0.01)
        compiler.timeout_s = 30
        result = await compiler.compile(spec("regex", "a+"))
        assert result.cache_hit  # the timed-out compile finished and was cached

    try:
        asyncio.run(run())
    finally:
        release.set()
        compiler.shutdown()


@pytest.fixture(scope="module")
def srv(model_dir):
    server = ServerThread(TokenizerServiceConfig(tokenizer=str(model_dir)))
    yield server
    server.close()


def prepare(srv, grammar, text: str = "hi"):
    prompts = pb.PromptList(prompts=[pb.PromptInput(text=text)])
    return srv.stub.Prepare(pb.PrepareRequest(prompts=prompts, grammar=grammar), timeout=30)


def part_of(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get(PART_METADATA_KEY)


def test_prepare_compiles_the_constraint(srv):
    regex = spec("regex", "[0-9]{3}", "guidance")
    r = prepare(srv, regex)
    assert r.grammar.backend == "guidance"
    assert r.grammar.handle == gm.grammar_handle("guidance", "regex", "[0-9]{3}", "")
    assert r.grammar.compiled  # the compiled form ships with the handle
    assert r.prompts[0].token_ids  # the prompt came back in the same call
    again = prepare(srv, regex)
    assert again.grammar == r.grammar and again.compile_seconds == 0  # a cache hit
    default = prepare(srv, spec("json_object"))
    assert default.grammar.backend == "xgrammar"  # the service's default backend
    assert b"root" in default.grammar.compiled  # xgrammar's serialized grammar
    assert not prepare(srv, None).HasField("grammar")


@pytest.mark.parametrize(
    "bad, match",
    [
        (spec("json", '{"type": "object", "properties": 5', "xgrammar"), "not valid JSON"),
        (spec("regex", "(", "guidance"), "unclosed group"),
        (spec("grammar", "root ::= x", "xgrammar"), 'Rule "x" is not defined'),
        (spec("json", json.dumps({"not": {}}), "xgrammar"), "'not'"),
    ],
)
def test_bad_constraint_is_invalid_argument_naming_the_part(srv, bad, match):
    with pytest.raises(grpc.RpcError) as info:
        prepare(srv, bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in info.value.details()
    assert part_of(info.value) == "grammar"
    assert srv.health_status() == health_pb2.HealthCheckResponse.SERVING
    assert srv.stub.Tokenize(pb.TokenizeRequest(text="still fine"), timeout=10).token_ids


def test_a_bad_prompt_is_named_as_the_part_and_a_bad_constraint_wins(srv):
    bad_chat = pb.PrepareRequest(chat=pb.ChatInput(messages_json="{oops"))
    with pytest.raises(grpc.RpcError) as info:
        srv.stub.Prepare(bad_chat, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not valid JSON" in info.value.details() and part_of(info.value) == "prompt"
    bad_chat.grammar.CopyFrom(spec("regex", "(", "guidance"))
    with pytest.raises(grpc.RpcError) as info:
        srv.stub.Prepare(bad_chat, timeout=30)
    assert "unclosed group" in info.value.details() and part_of(info.value) == "grammar"


def test_service_flags_reach_the_compiler(model_dir):
    from splitserve.tokenizer_svc.server import make_grammar_compiler
    from splitserve.tokenizer_svc.tokenizer import load_tokenizer

    config = TokenizerServiceConfig(
        tokenizer=str(model_dir),
        guided_decoding_backend="guidance",
        grammar_cache_size=7,
        grammar_compile_timeout_s=2.5,
        grammar_max_pending=3,
    )
    compiler = make_grammar_compiler(config, load_tokenizer(config))
    assert compiler.default_backend == "guidance"
    assert (compiler.cache_size, compiler.timeout_s, compiler.max_pending) == (7, 2.5, 3)
    assert compiler.tokenizer.vocab_size == len(compiler.tokenizer.hf_tokenizer) + EXTRA_VOCAB
    compiler.shutdown()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("guided_decoding_backend", "outlines", "guided_decoding_backend must be one of"),
        ("grammar_cache_size", -1, "grammar_cache_size must be >= 0"),
        ("grammar_compile_timeout_s", 0, "grammar_compile_timeout_s must be > 0"),
        ("grammar_compile_threads", 0, "grammar_compile_threads must be >= 1"),
        ("grammar_max_pending", 0, "grammar_max_pending must be >= 1"),
    ],
)
def test_bad_grammar_flags_are_refused(model_dir, field, value, match):
    with pytest.raises(ValueError, match=match):
        TokenizerServiceConfig(tokenizer=str(model_dir), **{field: value})
