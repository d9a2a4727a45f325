"""The sampling rank's grammar matchers: masks, replay after preemption, termination, errors.

The masks are checked against the tokenizer itself: a token is allowed exactly when its text
continues one of the choices.
"""

from __future__ import annotations

import json

import pytest

from splitserve.protos import common_pb2
from splitserve.testing.demo_model import build_tokenizer
from splitserve.tokenizer_svc import grammar as gm
from splitserve.worker.structured_output import TEST_COMPILE_GATE_ENV, StructuredOutputs

EXTRA = 40  # embedding rows past the tokenizer
STOP = [1, 4]
CHOICES = ["yes", "no way"]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("so_tok")))


@pytest.fixture(scope="module")
def compiler(hf_tok):
    return gm.GrammarCompiler(gm.GrammarTokenizer(hf_tok, len(hf_tok) + EXTRA, STOP))


@pytest.fixture()
def so(hf_tok):
    return StructuredOutputs(lambda: hf_tok, len(hf_tok) + EXTRA, STOP)


def compiled(compiler, kind, text, backend):
    return compiler.compile_sync(
        common_pb2.GrammarSpec(kind=kind, spec=text, backend=backend)
    ).grammar


def allowed(bitmask_row) -> set[int]:
    words = bitmask_row.tolist()
    return {w * 32 + b for w, word in enumerate(words) for b in range(32) if word >> b & 1}


BACKENDS = ["xgrammar", "guidance"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_allows_exactly_the_tokens_that_continue_a_choice(so, compiler, hf_tok, backend):
    grammar = compiled(compiler, "choice", json.dumps(CHOICES), backend)
    assert so.add("r", grammar, []) is None
    bitmask, failed = so.fill(["other", "r"], [1])
    assert not failed and bitmask.shape == (2, (len(hf_tok) + EXTRA + 31) // 32)
    got = allowed(bitmask[1])
    expected = set()
    for tok in range(len(hf_tok)):
        text = hf_tok.decode([tok])
        if text and "\ufffd" not in text and any(c.startswith(text) for c in CHOICES):
            expected.add(tok)
    assert expected and got == expected
    assert all(t < len(hf_tok) for t in got)  # padding rows of the embedding never allowed


@pytest.mark.parametrize("backend", BACKENDS)
def test_accept_advances_and_terminates(so, compiler, hf_tok, backend):
    grammar = compiled(compiler, "choice", json.dumps(CHOICES), backend)
    so.add("r", grammar, [])
    ids = hf_tok.encode("yes", add_special_tokens=False)
    for tok in ids:
        positions = so.active(["r"])
        assert positions == [0]
        done, errors = so.accept(["r"], positions, [tok])
        assert not errors
    if not done:  # xgrammar ends on a stop token; llguidance may stop by itself
        bitmask, _ = so.fill(["r"], [0])
        assert allowed(bitmask[0]) == set(STOP)
        done, errors = so.accept(["r"], [0], [STOP[0]])
    assert done == ["r"] and not errors
    assert so.active(["r"]) == []  # a terminated matcher asks for no mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_rebuilds_the_state_after_preemption(so, compiler, hf_tok, backend):
    grammar = compiled(compiler, "regex", "ab[0-9]+", backend)
    prefix = hf_tok.encode("ab1", add_special_tokens=False)
    assert so.add("r", grammar, prefix) is None
    bitmask, _ = so.fill(["r"], [0])
    for tok in allowed(bitmask[0]):
        text = hf_tok.decode([tok])
        assert tok in STOP or (text and text.isdigit()), (tok, text)
    error = so.add("bad", grammar, hf_tok.encode("xy", add_special_tokens=False))
    assert error and "breaks the grammar on replay" in error
    assert "bad" not in so


def test_rejected_token_is_a_request_error(so, compiler, hf_tok):
    so.add("r", compiled(compiler, "regex", "[0-9]+", "xgrammar"), [])
    letter = hf_tok.encode("x", add_special_tokens=False)[0]
    done, errors = so.accept(["r"], [0], [letter])
    assert not done and "not allowed by the grammar" in errors["r"]
    assert "r" not in so


def test_bad_payload_fails_only_that_request(so):
    bad = common_pb2.CompiledGrammar(handle="h", backend="xgrammar", compiled=b"{nonsense")
    error = so.add("r", bad, [])
    assert error and error.startswith("cannot build the grammar matcher")
    assert len(so) == 0


def test_compiled_grammars_are_cached_by_handle(hf_tok, compiler, monkeypatch, tmp_path):
    """Two requests with one grammar share one background compile; once it is done, a third
    gets its matcher at once from the cache."""
    gate = tmp_path / "gate"  # the compile waits for this file, so both adds see it pending
    monkeypatch.setenv(TEST_COMPILE_GATE_ENV, str(gate))
    so = StructuredOutputs(lambda: hf_tok, len(hf_tok) + EXTRA, STOP)
    grammar = compiled(compiler, "regex", "[a-z]+", "xgrammar")
    so.add("a", grammar, [])
    so.add("b", grammar, [])
    assert so._pending["a"].future is so._pending["b"].future and len(so) == 2
    gate.touch()
    _, failed = so.fill(["a", "b"], [0, 1])
    assert not failed and not so._pending
    cached = so._compiled[grammar.handle]
    so.add("c", grammar, [])
    assert "c" in so.matchers and so._compiled[grammar.handle] is cached and len(so) == 3
    for rid in "abc":
        so.remove(rid)
    assert len(so) == 0


def test_a_failing_background_compile_fails_its_request_at_the_first_mask(so, compiler):
    grammar = compiled(compiler, "regex", "[a-z]+", "xgrammar")

    def broken(parsed):
        raise RuntimeError("compiler exploded")

    so._compile_xgrammar = broken
    assert so.add("r", grammar, []) is None  # the compile has only started
    bitmask, failed = so.fill(["other", "r"], [1])
    assert "compiler exploded" in failed["r"] and bitmask[1].eq(-1).all()
    assert "r" not in so and grammar.handle not in so._compiling


def test_a_matcher_raising_on_accept_fails_its_request_only(so, compiler, hf_tok):
    grammar = compiled(compiler, "regex", "[a-z]+", "xgrammar")
    so.add("a", grammar, [])
    so.add("b", grammar, [])
    so.fill(["a", "b"], [0, 1])

    class Exploding:
        terminated = False

        def accept(self, token):
            raise RuntimeError("matcher bug")

    so.matchers["a"] = Exploding()
    letter = hf_tok.encode("x", add_special_tokens=False)[0]
    done, errors = so.accept(["a", "b"], [0, 1], [letter, letter])
    assert "matcher bug" in errors["a"] and "b" not in errors and not done
    assert "a" not in so and "b" in so


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_tokens_never_enter_a_json_string(so, compiler, hf_tok, backend):
    """xgrammar reads <|im_start|> as its literal text; it must still never be allowed."""
    grammar = compiled(compiler, "json", '{"type": "string"}', backend)
    so.add("r", grammar, hf_tok.encode('"a', add_special_tokens=False))
    bitmask, _ = so.fill(["r"], [0])
    got = allowed(bitmask[0])
    letter = hf_tok.encode("b", add_special_tokens=False)[0]
    assert letter in got
    special = set(hf_tok.all_special_ids) - set(STOP)
    assert special and not (special & got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bare_spec_masks_as_the_service_compiled_form_does(so, compiler, backend):
    """A direct caller's GrammarSpec is built on this rank: same handle and the same mask as
    the tokenizer service's compiled form of it, and it shares that form's cache entry."""
    spec = common_pb2.GrammarSpec(kind="choice", spec=json.dumps(CHOICES), backend=backend)
    assert so.add("spec", spec, []) is None
    assert so.add("shipped", compiler.compile_sync(spec).grammar, []) is None
    bitmask, failed = so.fill(["spec", "shipped"], [0, 1])
    assert not failed and allowed(bitmask[0]) and bitmask[0].equal(bitmask[1])
    handle = gm.grammar_handle(backend, "choice", spec.spec, "")
    assert list(so._built) == [handle] and handle in so._compiled


def test_a_bare_spec_without_a_backend_takes_the_ranks_default(hf_tok):
    so = StructuredOutputs(lambda: hf_tok, len(hf_tok) + EXTRA, STOP, default_backend="guidance")
    assert so.add("r", common_pb2.GrammarSpec(kind="regex", spec="[0-9]+"), []) is None
    assert type(so.matchers["r"]).__name__ == "_GuidanceMatcher"
    assert list(so._built) == [gm.grammar_handle("guidance", "regex", "[0-9]+", "")]


@pytest.mark.parametrize(
    "spec, words",
    [
        (common_pb2.GrammarSpec(kind="json", spec='{"not": {}}', backend="xgrammar"), "'not'"),
        (common_pb2.GrammarSpec(kind="regex", spec="(", backend="guidance"), "regex"),
        (common_pb2.GrammarSpec(kind="yaml", spec="a: 1"), "unknown constraint kind"),
    ],
)
def test_a_bad_bare_spec_fails_its_request_with_the_services_message(so, compiler, spec, words):
    error = so.add("r", spec, [])
    with pytest.raises(gm.GrammarError) as info:
        compiler.compile_sync(spec)
    assert error == info.value.message and words in error
    assert len(so) == 0
