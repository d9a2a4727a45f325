"""Structured outputs against the rest of the engine (in-process LLM on the tiny random llama):
stop strings, prefix caching, a slow grammar compile, and a grammar matcher that fails.

Outputs are checked by a matcher of our own (`Checker`) or by `re.fullmatch`, never by the
matcher that produced them; after every test the worker holds no matcher and no batch row, and
the scheduler's free blocks are back at their idle count.
"""

from __future__ import annotations

import re
import threading

import pytest

from splitserve import LLM, SamplingParams, StructuredOutputsParams
from splitserve.common.messages_proto import generate_request_from_proto
from splitserve.protos import scheduler_pb2
from splitserve.worker.structured_output import _XgrammarMatcher

from .structured_utils import whitespace_bias

REGEX = r"[a-z]{2,6}-[0-9]{1,3}"
CHOICES = ["yes", "no way", "maybe 🙂"]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}},
    "required": ["ok", "level"],
    "additionalProperties": False,
}
# Many blocks of 16 tokens shared by the prefix-caching prompts.
SHARED = " ".join(["Beautiful is better than ugly, explicit is better than implicit."] * 6)


def constrained(backend="xgrammar", max_tokens=40, **kwargs) -> SamplingParams:
    so = {k: v for k, v in kwargs.items() if k in ("json", "regex", "choice", "grammar")}
    rest = {k: v for k, v in kwargs.items() if k not in so}
    return SamplingParams(
        max_tokens=max_tokens,
        structured_outputs=StructuredOutputsParams(backend=backend, **so),
        **rest,
    )


@pytest.fixture(scope="module")
def idle_blocks(llm):
    return llm.engine.scheduler.kv.num_free_blocks


def assert_all_released(llm, idle_blocks):
    runner = llm.engine.executor.runner
    assert not llm.engine.has_work
    assert len(runner.structured) == 0, runner.structured.matchers
    assert not runner.batch.rows, runner.batch.rows
    assert llm.engine.scheduler.kv.num_free_blocks == idle_blocks


def add(llm, rid: str, prompt: str, sp: SamplingParams) -> None:
    llm.engine.scheduler.add_request(
        generate_request_from_proto(
            scheduler_pb2.GenerateRequest(
                request_id=rid,
                prompt_token_ids=llm.tokenizer.encode(prompt, add_special_tokens=True),
                sampling_params=sp.to_proto(),
            )
        ),
        llm._compile(sp),
    )


def drain(llm, outputs: dict, on_step=None) -> dict[str, str]:
    """Step the engine until idle; token ids by request into `outputs`, errors returned."""
    errors: dict[str, str] = {}
    while llm.engine.has_work:
        for out in llm.engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
            if out.error:
                errors[out.request_id] = out.error
        if on_step is not None:
            on_step()
    return errors


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_a_stop_string_cuts_a_constrained_output(llm, idle_blocks, backend):
    (full,) = llm.generate(["The answer is"], constrained(backend, regex=REGEX, temperature=0))
    text = full.outputs[0].text
    assert full.outputs[0].finish_reason == "stop" and re.fullmatch(REGEX, text), text
    (cut,) = llm.generate(
        ["The answer is"], constrained(backend, regex=REGEX, temperature=0, stop=["-"])
    )
    out = cut.outputs[0]
    assert out.text == text.split("-")[0]
    assert out.finish_reason == "stop" and out.stop_reason == "-"
    assert len(out.token_ids) <= len(full.outputs[0].token_ids)
    assert_all_released(llm, idle_blocks)


def test_prefix_cache_hits_keep_constraints_and_leak_no_state(
    llm, llama_path, checker, idle_blocks
):
    no_ws = whitespace_bias(llm.get_tokenizer())
    json_sp = constrained("xgrammar", json=SCHEMA, temperature=0, logit_bias=no_ws)
    regex_sp = constrained("guidance", regex=REGEX, temperature=0.8, seed=5)
    (a,) = llm.generate([SHARED + " Flat is"], json_sp)
    (b,) = llm.generate([SHARED + " Sparse is"], regex_sp)
    assert b.num_cached_tokens >= 4 * 16  # the second request reuses the shared blocks
    for out, kind, text, backend in (
        (a.outputs[0], "json", json_sp.structured_outputs.json, "guidance"),
        (b.outputs[0], "regex", REGEX, "xgrammar"),
    ):
        import json

        spec = text if isinstance(text, str) else json.dumps(text)
        grammar = checker.compile(kind, spec, backend)  # the other backend checks
        want = "complete" if out.finish_reason == "stop" else "prefix"
        assert checker.status(grammar, out.token_ids) == want, out.text

    prompt = SHARED + " Readability counts"
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    fresh = LLM(str(llama_path), kv_cache_memory=8 << 20)
    try:
        (expected,) = fresh.generate([prompt], plain)
    finally:
        fresh.shutdown()
    (c,) = llm.generate([prompt], constrained("xgrammar", choice=CHOICES, temperature=0))
    assert c.outputs[0].text in CHOICES
    (d,) = llm.generate([prompt], plain)
    assert d.num_cached_tokens >= 4 * 16
    assert d.outputs[0].token_ids == expected.outputs[0].token_ids
    assert_all_released(llm, idle_blocks)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_slow_compile_holds_back_only_its_own_request(llama_path, depth):
    """The worker's xgrammar compile of a new grammar is held until the unconstrained request
    has decoded several more tokens. Were the compile done inside a step, or awaited for the
    first mask, that step would wait for it and `released.wait` would time out. The held-back
    request then gives the same tokens as when its grammar is ready at once."""
    small = LLM(str(llama_path), kv_cache_memory=8 << 20, async_scheduling_depth=depth)
    try:
        plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        slow_sp = constrained("xgrammar", regex=REGEX, temperature=0)
        (alone,) = small.generate(["Errors should never"], plain)
        structured = small.engine.executor.runner.structured
        released, waited = threading.Event(), []
        compile_now = structured._compile_xgrammar

        def slow_compile(parsed):
            waited.append(released.wait(20))
            return compile_now(parsed)

        structured._compile_xgrammar = slow_compile
        tokens: dict[str, list[int]] = {"plain": []}
        add(small, "plain", "Errors should never", plain)
        while not tokens["plain"]:
            for out in small.engine.step():
                tokens["plain"].extend(out.token_ids)
        add(small, "slow", "The answer is", slow_sp)  # prefilled in one step

        def release_after_four_tokens():
            if not released.is_set() and len(tokens["plain"]) >= 4:
                assert not tokens.get("slow")  # it cannot sample before its matcher exists
                released.set()

        errors = drain(small, tokens, release_after_four_tokens)
        assert not errors and waited == [True]
        assert tokens["plain"] == alone.outputs[0].token_ids
        (again,) = small.generate(["The answer is"], slow_sp)  # compiled: no deferral
        assert tokens["slow"] == again.outputs[0].token_ids
        assert re.fullmatch(REGEX, again.outputs[0].text), again.outputs[0].text
        assert len(structured) == 0 and not small.engine.executor.runner.deferred_ids
        assert small.engine.scheduler.kv.num_free_blocks == small.engine.num_blocks
    finally:
        small.shutdown()


class _FailingMatcher(_XgrammarMatcher):
    """A real xgrammar matcher that fails after `after` tokens, in accept or in fill."""

    __slots__ = ("accepted", "after", "where")

    def __init__(self, real: _XgrammarMatcher, after: int, where: str) -> None:
        self.matcher, self.accepted, self.after, self.where = real.matcher, 0, after, where

    def accept(self, token: int) -> bool:
        if self.where == "accept" and self.accepted == self.after:
            raise RuntimeError("grammar bug in accept")
        self.accepted += 1
        ok = self.matcher.accept_token(token)
        if self.where == "fill" and self.accepted == self.after:
            self.matcher = None  # the batched fill breaks on it; the row-by-row one raises
        return ok

    def fill(self, bitmask, row: int) -> None:
        if self.matcher is None:
            raise RuntimeError("grammar bug in fill")
        super().fill(bitmask, row)

    @property
    def terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()


def test_a_failing_matcher_fails_only_its_request(llm, idle_blocks, monkeypatch):
    """CHECKLIST row 23 through the engine: two requests whose matcher raises (in accept, in
    the mask fill) get an error; the constrained and plain requests beside them finish as
    they would alone, and everything the failed ones held is released."""
    structured = llm.engine.executor.runner.structured
    start = structured._start
    plain = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    good = constrained("xgrammar", choice=CHOICES, temperature=0)
    (plain_alone, good_alone) = llm.generate(
        ["Errors should never", "The answer is"], [plain, good]
    )

    def start_failing(rid, grammar, compiled, replay):
        error = start(rid, grammar, compiled, replay)
        if rid.startswith("bad-"):
            structured.matchers[rid] = _FailingMatcher(structured.matchers[rid], 2, rid[4:])
        return error

    monkeypatch.setattr(structured, "_start", start_failing)
    long_regex = constrained("xgrammar", regex="[a-z ]{20,40}[.]", temperature=0)
    add(llm, "bad-accept", "Beautiful is better than", long_regex)
    add(llm, "bad-fill", "Simple is better than", long_regex)
    add(llm, "good", "The answer is", good)
    add(llm, "plain", "Errors should never", plain)
    tokens: dict[str, list[int]] = {}
    errors = drain(llm, tokens)
    assert set(errors) == {"bad-accept", "bad-fill"}
    assert "grammar bug in accept" in errors["bad-accept"]
    assert "grammar bug in fill" in errors["bad-fill"]
    # The token sampled in the failing step is not output (unchecked by its grammar).
    assert len(tokens["bad-accept"]) == 2 and len(tokens["bad-fill"]) == 2
    assert tokens["plain"] == plain_alone.outputs[0].token_ids
    assert tokens["good"] == good_alone.outputs[0].token_ids
    assert_all_released(llm, idle_blocks)


def test_a_failed_request_fails_its_generate_call_and_leaves_nothing(llm, idle_blocks, monkeypatch):
    """Through `LLM.generate`: the call with the failing request raises, its other requests
    are aborted rather than left running, and the next call works."""
    structured = llm.engine.executor.runner.structured
    start = structured._start
    broken = constrained("xgrammar", regex="[a-z ]{20,40}[.]", temperature=0)
    handle = llm._compile(broken).handle

    def start_failing(rid, grammar, compiled, replay):
        error = start(rid, grammar, compiled, replay)
        if grammar.handle == handle:
            structured.matchers[rid] = _FailingMatcher(structured.matchers[rid], 1, "accept")
        return error

    monkeypatch.setattr(structured, "_start", start_failing)
    plain = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    with pytest.raises(RuntimeError, match="grammar bug in accept"):
        llm.generate(["Beautiful is", "Errors should never"], [broken, plain])
    (again,) = llm.generate(["Errors should never"], plain)
    assert len(again.outputs[0].token_ids) == 30
    assert_all_released(llm, idle_blocks)


class _TwoRanks:
    """Two pipeline ranks in this process, run one after the other for each step."""

    def __init__(self, path: str) -> None:
        from splitserve.worker.config import WorkerConfig
        from splitserve.worker.model_runner import ModelRunner

        self.ranks = [
            ModelRunner(
                WorkerConfig(model=path, kv_cache_memory=8 << 20, rank=r, pipeline_parallel_size=2)
            )
            for r in range(2)
        ]
        self.results: list = []

    def describe(self, block_size: int, engine=None):
        return [r.describe(block_size, engine) for r in self.ranks]

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        for r in self.ranks:
            r.initialize_cache(num_blocks, block_size)

    def submit(self, step) -> None:
        self.results.append(self.ranks[1].execute(step, self.ranks[0].execute(step)))

    def get_result(self):
        return self.results.pop(0)

    def shutdown(self) -> None:
        for r in self.ranks:
            if r.structured is not None:
                r.structured.shutdown()


def test_a_deferred_request_keeps_pipeline_ranks_in_step(llm, llama_path):
    """With two pipeline ranks only the last one knows the grammar is compiling; the first
    computes the deferred position again because the scheduler schedules it again."""
    from splitserve.scheduler.config import SchedulerConfig
    from splitserve.scheduler.engine_core import EngineCore

    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    slow_sp = constrained("xgrammar", regex=REGEX, temperature=0)
    expected = llm.generate(["Errors should never", "The answer is"], [plain, slow_sp])
    executor = _TwoRanks(str(llama_path))
    engine = EngineCore(SchedulerConfig(), executor)
    structured = executor.ranks[1].structured
    released, waited = threading.Event(), []
    compile_now = structured._compile_xgrammar

    def slow_compile(parsed):
        waited.append(released.wait(20))
        return compile_now(parsed)

    structured._compile_xgrammar = slow_compile
    tokens: dict[str, list[int]] = {}
    for rid, prompt, sp in (
        ("plain", "Errors should never", plain),
        ("slow", "The answer is", slow_sp),
    ):
        engine.scheduler.add_request(
            generate_request_from_proto(
                scheduler_pb2.GenerateRequest(
                    request_id=rid,
                    prompt_token_ids=llm.tokenizer.encode(prompt, add_special_tokens=True),
                    sampling_params=sp.to_proto(),
                )
            ),
            llm._compile(sp),
        )
    try:
        while engine.has_work:
            for out in engine.step():
                assert not out.error, out.error
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if not released.is_set() and len(tokens.get("plain", [])) >= 4:
                assert not tokens.get("slow")
                released.set()
    finally:
        released.set()
        executor.shutdown()
    assert waited == [True]
    assert tokens["plain"] == expected[0].outputs[0].token_ids
    assert tokens["slow"] == expected[1].outputs[0].token_ids
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks
