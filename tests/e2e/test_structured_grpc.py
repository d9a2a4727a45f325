"""Structured outputs across the real processes of `splitserve serve`, through the scheduler's
public gRPC API: a direct caller's bare constraint passes through the scheduler untouched and
the sampling rank compiles it (with the tokenizer service's checks) and applies the bitmask; a
bad constraint is INVALID_ARGUMENT and leaves the stack healthy with every KV block free.
"""

from __future__ import annotations

import json
import re

import grpc
import httpx
import pytest

from splitserve.protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc

REGEX = r"[a-z]{3,8}-[0-9]{2}"
CHOICES = ["red", "green 🙂", "blue sky"]


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.scheduler_address)
    yield scheduler_pb2_grpc.SchedulerServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def generate(stub, rid, kind, spec, backend, **sp):
    req = scheduler_pb2.GenerateRequest(
        request_id=rid,
        prompt_token_ids=[10, 11, 12, 13],
        sampling_params=common_pb2.SamplingParams(max_tokens=24, **sp),
        grammar=common_pb2.GrammarSpec(kind=kind, spec=spec, backend=backend),
    )
    ids, finish = [], None
    for r in stub.Generate(req, timeout=60):
        ids.extend(r.token_ids)
        finish = r.finish_reason
    return ids, finish


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_regex_and_choice_over_grpc(stub, tokenizer, backend):
    for i, temperature in enumerate([0.0, 1.0]):
        ids, finish = generate(
            stub, f"re-{backend}-{i}", "regex", REGEX, backend, temperature=temperature, seed=i
        )
        assert finish == common_pb2.FinishReason.FINISH_REASON_STOP
        assert re.fullmatch(REGEX, tokenizer.decode(ids, skip_special_tokens=True))
        ids, finish = generate(
            stub, f"ch-{backend}-{i}", "choice", json.dumps(CHOICES), backend, seed=i
        )
        assert finish == common_pb2.FinishReason.FINISH_REASON_STOP
        assert tokenizer.decode(ids, skip_special_tokens=True) in CHOICES


def test_bad_constraint_is_invalid_argument_and_the_stack_stays_healthy(server, stub):
    idle = server.scheduler_stats().num_free_blocks
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, "bad", "json", json.dumps({"not": {"type": "string"}}), "xgrammar")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'not'" in info.value.details()
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    ids, finish = generate(stub, "after", "regex", "[0-9]{4}", "auto", temperature=0)
    assert finish == common_pb2.FinishReason.FINISH_REASON_STOP and len(ids) >= 1
    assert server.scheduler_stats().num_free_blocks == idle


def test_a_bare_constraint_takes_the_default_backend_auto(stub, tokenizer):
    """A direct caller's GrammarSpec names no backend: the sampling rank compiles it under the
    default, auto, so a string pattern with a length bound (xgrammar would drop the bound,
    and was refused under the old xgrammar default) is served by llguidance."""
    import jsonschema

    schema = {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}
    for i in range(3):
        ids, finish = generate(stub, f"bare-{i}", "json", json.dumps(schema), "", seed=i)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert finish == common_pb2.FinishReason.FINISH_REASON_STOP, text
        jsonschema.validate(json.loads(text), schema)
