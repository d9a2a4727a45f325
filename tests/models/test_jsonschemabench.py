"""The 199 real-world schemas of ../shared/testdata/jsonschemabench (see its README) through
the in-process engine, on both backends: each compiles or is refused with INVALID_ARGUMENT
(never another error), and every generated document is accepted: a complete one validates with
`jsonschema`; one cut at max_tokens is a valid prefix for the other backend's matcher when that
backend takes the schema and is not narrower there (else for a fresh matcher of its own).
Counts are printed per set.
"""

from __future__ import annotations

import collections
import json
import pathlib

import jsonschema
import pytest

from splitserve import LLM, SamplingParams, StructuredOutputsParams
from splitserve.tokenizer_svc import grammar as gm
from splitserve.tokenizer_svc.config import TokenizerServiceConfig
from splitserve.tokenizer_svc.grammar import GrammarError
from splitserve.tokenizer_svc.schema_disjoint import one_of_lists
from splitserve.tokenizer_svc.server import make_grammar_compiler

from .conftest import LLAMA_EOS
from .structured_utils import OTHER, Checker, whitespace_bias

ROOT = pathlib.Path(__file__).resolve().parents[3] / "shared" / "testdata" / "jsonschemabench"
if not ROOT.is_dir():  # the worktree may sit elsewhere; the data is shared
    ROOT = pathlib.Path("/work/shared/testdata/jsonschemabench")

MAX_TOKENS = 24


def schemas() -> list[tuple[str, str, str]]:
    """(set, file name, schema text) for every schema."""
    return [(p.parent.name, p.name, p.read_text()) for p in sorted(ROOT.glob("*/*.json"))]


@pytest.fixture(scope="module")
def llm(llama_path):
    engine = LLM(str(llama_path), kv_cache_memory=32 << 20, max_num_seqs=256)
    yield engine
    engine.shutdown()


@pytest.mark.skipif(not ROOT.is_dir(), reason="jsonschemabench data not present")
@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_jsonschemabench(llm, backend):
    all_schemas = schemas()
    assert len(all_schemas) == 199
    checker = Checker(llm, LLAMA_EOS)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    accepted, params, prompts = [], [], []
    bias = whitespace_bias(llm.get_tokenizer())
    for group, name, text in all_schemas:
        try:
            checker.compiler.compile_sync(
                StructuredOutputsParams(json=text, backend=backend).to_proto()
            )
        except GrammarError as exc:
            assert exc.status == "INVALID_ARGUMENT"
            counts[group]["refused"] += 1
            continue
        counts[group]["compiled"] += 1
        accepted.append((group, name, text))
        params.append(
            SamplingParams(
                max_tokens=MAX_TOKENS,
                temperature=0,
                logit_bias=bias,
                structured_outputs=StructuredOutputsParams(json=text, backend=backend),
            )
        )
        prompts.append(f"A {group} document:")
    results = llm.generate(prompts, params)
    for (group, name, text), result in zip(accepted, results):
        out = result.outputs[0]
        if out.finish_reason == "stop":
            schema = json.loads(text)
            validator = jsonschema.validators.validator_for(schema)(schema)
            errors = list(validator.iter_errors(json.loads(out.text)))
            assert not errors, (group, name, out.text, errors[0].message)
            counts[group]["complete"] += 1
        else:
            assert out.finish_reason == "length", (group, name, out)
            other = checker.compile("json", text, OTHER[backend])
            if other is not None and checker.status(other, out.token_ids) != "rejected":
                counts[group]["cut, prefix for the other backend"] += 1
                continue
            # The other backend refuses the schema, or is narrower than JSON Schema here
            # (xgrammar anchors `pattern`, llguidance refuses raw DEL): a fresh matcher of
            # the same backend must still take the tokens.
            same = checker.compile("json", text, backend)
            assert checker.status(same, out.token_ids) != "rejected", (group, name, out.text)
            counts[group]["cut, prefix for its own backend"] += 1
    print(f"\njsonschemabench on {backend} (max_tokens {MAX_TOKENS}):")
    for group in sorted(counts):
        print(f"  {group:16s} {dict(sorted(counts[group].items()))}")
    total = sum(counts.values(), collections.Counter())
    print(f"  {'total':16s} {dict(sorted(total.items()))}")
    assert total["compiled"] >= 100 and total["complete"] >= 10


# Refused under the default backend (auto): 25 of 199, each using something neither backend
# enforces exactly (a oneOf not provably disjoint, uniqueItems, propertyNames, if/then, an
# unknown string format, more than 3 dependencies in one subschema) or llguidance cannot
# follow (a circular $ref with sibling keys).
# Under the old default, xgrammar, 63 were.
DEFAULT_REFUSED = 25


def _multi_one_of(schema) -> bool:
    return any(len(branches) > 1 for branches in one_of_lists(schema))


@pytest.mark.skipif(not ROOT.is_dir(), reason="jsonschemabench data not present")
def test_jsonschemabench_under_the_default_backend(llm, llama_path):
    """The service's compiler with no backend flag: count what it refuses, then generate for
    every schema it serves that the old default (xgrammar) refused, and check the output."""
    compiler = make_grammar_compiler(
        TokenizerServiceConfig(tokenizer=str(llama_path)), llm.tokenizer
    )
    assert compiler.default_backend == "auto"
    used: collections.Counter = collections.Counter()
    refused: dict[str, str] = {}
    newly: list[tuple[str, str, str]] = []
    features: collections.Counter = collections.Counter()
    for group, name, text in schemas():
        try:
            result = compiler.compile_sync(StructuredOutputsParams(json=text).to_proto())
        except GrammarError as exc:
            assert exc.status == "INVALID_ARGUMENT"
            assert "no backend can enforce this constraint" in exc.message, (name, exc.message)
            refused[f"{group}/{name}"] = exc.message
            continue
        used[result.grammar.backend] += 1
        schema = json.loads(text)
        old_refusal = gm.xgrammar_unsupported(schema)
        if old_refusal or _multi_one_of(schema):  # xgrammar refused every oneOf before
            newly.append((group, name, text))
            if _multi_one_of(schema):
                features["oneOf"] += 1
            for feature in ("'allOf'", "'pattern' together with", "'format' together with"):
                if old_refusal and feature in old_refusal:
                    features[feature] += 1
    print(f"\njsonschemabench, default backend: {dict(used)}, refused {len(refused)}")
    for name, message in sorted(refused.items()):
        print(f"  {name}: {message[:160]}")
    print(f"  served now, refused by the old default: {len(newly)} {dict(features)}")
    assert len(refused) == DEFAULT_REFUSED
    assert used["xgrammar"] > 100 and used["guidance"] > 10
    assert features["oneOf"] >= 10 and features["'allOf'"] >= 1
    assert features["'pattern' together with"] >= 1

    checker = Checker(llm, LLAMA_EOS)
    bias = whitespace_bias(llm.get_tokenizer())
    params = [
        SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0,
            logit_bias=bias,
            structured_outputs=StructuredOutputsParams(json=text),
        )
        for _, _, text in newly
    ]
    results = llm.generate([f"A {group} document:" for group, _, _ in newly], params)
    complete = 0
    for (group, name, text), result in zip(newly, results):
        out = result.outputs[0]
        if out.finish_reason == "stop":
            schema = json.loads(text)
            validator = jsonschema.validators.validator_for(schema)(schema)
            errors = list(validator.iter_errors(json.loads(out.text)))
            assert not errors, (group, name, out.text, errors[0].message)
            complete += 1
        else:
            assert out.finish_reason == "length", (group, name, out)
            fresh = compiler.compile_sync(StructuredOutputsParams(json=text).to_proto()).grammar
            assert checker.status(fresh, out.token_ids) != "rejected", (group, name, out.text)
    assert complete >= 3
