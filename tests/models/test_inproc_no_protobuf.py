"""The in-process engine pays no protobuf: once started, a generation through `LLM` builds no
protobuf message at all (the scheduler plans `messages.StepRequest` dataclasses and the
runner answers `messages.StepResult` ones; only the gRPC edges convert).

Every message class of the generated protobuf modules is replaced by one that raises when
built, then a generation that exercises logprobs, prompt logprobs, seeds, penalties, stop ids,
n > 1 and preemption-free chunked prefill runs to the same outputs as before.
"""

from __future__ import annotations

import pytest

from splitserve import SamplingParams
from splitserve.common import messages as msg
from splitserve.protos import common_pb2, scheduler_pb2, worker_pb2

PROMPTS = [[5, 17, 300, 42, 99, 7], list(range(20, 61)), [8] * 3]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3),
        SamplingParams(
            max_tokens=9,
            temperature=0.8,
            seed=7,
            n=2,
            prompt_logprobs=2,
            repetition_penalty=1.2,
            logit_bias={11: 2.0},
            ignore_eos=True,
        ),
        SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[1], min_tokens=2),
    ]


def _summary(outs) -> list:
    return [
        (
            o.prompt_token_ids,
            [
                (
                    c.token_ids,
                    c.finish_reason,
                    [(lp.token_id, lp.top_token_ids) for lp in c.logprobs or ()],
                )
                for c in o.outputs
            ],
            [(lp.token_id, lp.rank) for lp in o.prompt_logprobs or ()],
        )
        for o in outs
    ]


class _Built(Exception):
    pass


def _forbid_protobuf(monkeypatch) -> list[str]:
    """Make building any message of the engine's protobuf modules raise (and record it)."""
    built: list[str] = []
    for module in (common_pb2, scheduler_pb2, worker_pb2):
        for name in module.DESCRIPTOR.message_types_by_name:

            def forbidden(*args, _name=f"{module.__name__}.{name}", **kwargs):
                built.append(_name)
                raise _Built(f"{_name} built in the in-process engine")

            monkeypatch.setattr(module, name, forbidden)
    return built


def test_an_inprocess_generation_builds_no_protobuf_message(llm, monkeypatch):
    # NOTE: run twice first: a prompt's second run hits the prefix cache, and prompt logprobs
    # then cover only the positions computed (the patched run below is a second run too).
    llm.generate(PROMPTS, _params(), use_tqdm=False)
    want = _summary(llm.generate(PROMPTS, _params(), use_tqdm=False))
    steps, results = [], []
    executor = llm.engine.executor
    submit, get_result = executor.submit, executor.get_result

    def checked_submit(step):
        steps.append(type(step))
        submit(step)

    def checked_get_result():
        result = get_result()
        results.append(type(result))
        return result

    monkeypatch.setattr(executor, "submit", checked_submit)
    monkeypatch.setattr(executor, "get_result", checked_get_result)
    built = _forbid_protobuf(monkeypatch)
    got = _summary(llm.generate(PROMPTS, _params(), use_tqdm=False))
    assert built == []
    assert steps and set(steps) == {msg.StepRequest}
    assert results and set(results) == {msg.StepResult}
    assert got == want


def test_the_forbidding_catches_a_protobuf_step(llm, monkeypatch):
    """The check itself: a message built the old way is caught."""
    built = _forbid_protobuf(monkeypatch)
    with pytest.raises(_Built):
        worker_pb2.StepRequest(step_id=1)
    assert built == ["splitserve.protos.worker_pb2.StepRequest"]
