"""Structured outputs through the whole engine (in-process LLM: scheduler + worker) on the tiny
random llama (its embedding has 24 rows past the tokenizer), for both backends.

Every output is checked by something other than the matcher that produced it: `re.fullmatch`,
`jsonschema`, the list of choices, and for outputs cut at max_tokens the other backend's
matcher (the output must be a valid prefix).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from splitserve import LLM, SamplingParams, StructuredOutputsParams

from .structured_utils import OTHER, whitespace_bias

BACKENDS = ["xgrammar", "guidance"]
PROMPTS = ["Beautiful is better than", "The answer is", "Errors should never"]

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "level": {"enum": ["low", "high"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "level"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}-[0-9]{1,3}"
CHOICES = ["yes", "no way", "maybe 🙂"]
EBNF = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
EBNF_AS_REGEX = r"\((?:[0-9]|[1-9][0-9])(?:\+(?:[0-9]|[1-9][0-9]))*\)"


@pytest.fixture(scope="module")
def no_ws(llm):
    return whitespace_bias(llm.get_tokenizer())


def constrained(backend, max_tokens=40, **kwargs):
    so = {k: v for k, v in kwargs.items() if k in ("json", "regex", "choice", "grammar")}
    rest = {k: v for k, v in kwargs.items() if k not in so}
    return SamplingParams(
        max_tokens=max_tokens,
        structured_outputs=StructuredOutputsParams(backend=backend, **so),
        **rest,
    )


def check_cut(checker, kind, text, backend, out):
    """An output cut at max_tokens is a valid prefix for the other backend's matcher."""
    other = checker.compile(kind, text, OTHER[backend])
    assert other is not None
    assert checker.status(other, out.token_ids) in ("prefix", "complete"), out.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_regex_choice_and_grammar_hold_on_both_backends(llm, checker, no_ws, backend):
    sampled = dict(temperature=0.9, seed=7, n=2)
    params = [
        constrained(backend, json=SCHEMA, temperature=0, logit_bias=no_ws),
        constrained(backend, json=SCHEMA, logit_bias=no_ws, **sampled),
        constrained(backend, regex=REGEX, temperature=0),
        constrained(backend, regex=REGEX, **sampled),
        constrained(backend, choice=CHOICES, temperature=0),
        constrained(backend, choice=CHOICES, **sampled),
        constrained(backend, grammar=EBNF, temperature=0, max_tokens=12),
        constrained(backend, grammar=EBNF, **sampled, max_tokens=12),
    ]
    kinds = [
        ("json", json.dumps(SCHEMA)),
        ("json", json.dumps(SCHEMA)),
        ("regex", REGEX),
        ("regex", REGEX),
        ("choice", json.dumps(CHOICES)),
        ("choice", json.dumps(CHOICES)),
        ("grammar", EBNF),
        ("grammar", EBNF),
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    results = llm.generate(prompts, params)
    finished = 0
    for (kind, text), result in zip(kinds, results):
        for out in result.outputs:
            if out.finish_reason == "length":
                check_cut(checker, kind, text, backend, out)
                continue
            assert out.finish_reason == "stop", out
            finished += 1
            if kind == "json":
                jsonschema.validate(json.loads(out.text), SCHEMA)
            elif kind == "regex":
                assert re.fullmatch(REGEX, out.text), out.text
            elif kind == "choice":
                assert out.text in CHOICES
            else:
                assert re.fullmatch(EBNF_AS_REGEX, out.text), out.text
    assert finished >= 10  # most of the 16 sequences end by their grammar


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_object(llm, no_ws, backend):
    params = SamplingParams(
        max_tokens=48,
        temperature=0,
        logit_bias=no_ws,
        structured_outputs=StructuredOutputsParams(json_object=True, backend=backend),
    )
    (result,) = llm.generate([PROMPTS[0]], params)
    out = result.outputs[0]
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.text.lstrip().startswith("{")


def test_unconstrained_rows_get_the_same_tokens_in_a_mixed_batch(llm):
    plain = [SamplingParams(max_tokens=16, temperature=0)] * 2
    alone = llm.generate(PROMPTS[:2], plain)
    mixed = llm.generate(
        [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[2]],
        [
            plain[0],
            constrained("xgrammar", regex=REGEX, temperature=0),
            plain[1],
            constrained("guidance", choice=CHOICES, temperature=0.8, seed=3),
        ],
    )
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[2].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert re.fullmatch(REGEX, mixed[1].outputs[0].text)
    assert mixed[3].outputs[0].text in CHOICES


def test_grammar_survives_preemption(llm, llama_path):
    """A tight cache preempts constrained requests mid-output; the matcher is rebuilt by
    replaying their tokens, so the outputs equal those of an engine with room to spare."""
    long_regex = "[a-z ]{40,80}[.]"
    params = [
        constrained(backend, **kind, temperature=0, max_tokens=40)
        for backend in BACKENDS
        for kind in ({"json": SCHEMA}, {"regex": long_regex}, {"grammar": EBNF})
    ]
    # Each request needs up to 15 of the 24 blocks; together they need far more.
    prompts = [PROMPTS[i % len(PROMPTS)] * 2 for i in range(len(params))]
    roomy = llm.generate(prompts, params)
    tight = LLM(str(llama_path), kv_cache_memory=24 * 4 * 512, block_size=4)
    try:
        squeezed = tight.generate(prompts, params)
        assert tight.engine.scheduler.num_preemptions > 0
    finally:
        tight.shutdown()
    for a, b in zip(roomy, squeezed):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_a_refused_constraint_fails_only_that_call(llm):
    with pytest.raises(ValueError, match="'not'"):
        llm.generate([PROMPTS[0]], constrained("xgrammar", json={"not": {"type": "integer"}}))
    with pytest.raises(ValueError, match="unclosed group"):
        llm.generate([PROMPTS[0]], constrained("guidance", regex="(ab"))
    assert not llm.engine.has_work
    (ok,) = llm.generate([PROMPTS[1]], constrained("auto", choice=["a", "b"], temperature=0))
    assert ok.outputs[0].text in ("a", "b")


def test_structured_outputs_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="backend must be"):
        StructuredOutputsParams(regex="a", backend="outlines")
