"""The engine's dataclasses (splitserve/common/messages.py) against the protobuf messages, and
the converters at the gRPC edges (splitserve/common/messages_proto.py).

Every field of every .proto message the engine carries must be a dataclass field of the same
name, and must survive proto -> dataclass -> proto. The protos here are filled from their
descriptors (every field, nested ones too), so a field added to a .proto and forgotten in a
dataclass or a converter fails here without anyone touching this file.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from google.protobuf.descriptor import FieldDescriptor

from splitserve.common import messages as msg
from splitserve.common import messages_proto as conv
from splitserve.protos import common_pb2, scheduler_pb2, worker_pb2

PAIRS = [
    (msg.SamplingParams, common_pb2.SamplingParams),
    (msg.TokenLogprobs, common_pb2.TokenLogprobs),
    (msg.GrammarSpec, common_pb2.GrammarSpec),
    (msg.CompiledGrammar, common_pb2.CompiledGrammar),
    (msg.TensorData, common_pb2.TensorData),
    (msg.MultiModalInput, common_pb2.MultiModalInput),
    (msg.GenerateRequest, scheduler_pb2.GenerateRequest),
    (msg.NewRequest, worker_pb2.NewRequest),
    (msg.CachedRequest, worker_pb2.CachedRequest),
    (msg.StepRequest, worker_pb2.StepRequest),
    (msg.PooledOutput, worker_pb2.PooledOutput),
    (msg.StepResult, worker_pb2.StepResult),
    (msg.EplbReport, worker_pb2.EplbReport),
]

ROUND_TRIPS = [
    (common_pb2.SamplingParams, conv.sampling_params_from_proto, conv.sampling_params_to_proto),
    (common_pb2.TokenLogprobs, conv.token_logprobs_from_proto, conv.token_logprobs_to_proto),
    (common_pb2.GrammarSpec, conv.grammar_spec_from_proto, conv.grammar_spec_to_proto),
    (
        common_pb2.CompiledGrammar,
        conv.compiled_grammar_from_proto,
        conv.compiled_grammar_to_proto,
    ),
    (common_pb2.MultiModalInput, conv.mm_input_from_proto, conv.mm_input_to_proto),
    (
        scheduler_pb2.GenerateRequest,
        conv.generate_request_from_proto,
        conv.generate_request_to_proto,
    ),
    (worker_pb2.StepRequest, conv.step_request_from_proto, conv.step_request_to_proto),
    (worker_pb2.StepResult, conv.step_result_from_proto, conv.step_result_to_proto),
]


def _scalar(fd: FieldDescriptor, i: int):
    """A value of the field's type that is not its default (distinct per `i`)."""
    t = fd.type
    if t in (FieldDescriptor.TYPE_STRING,):
        return f"{fd.name}-{i}"
    if t == FieldDescriptor.TYPE_BYTES:
        return f"{fd.name}-{i}".encode()
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.5 + i  # exact in float32
    if t == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values[-1].number
    return 3 + i  # every integer type; never 0 (a TokenLogprobs rank of 0 means "absent")


def fill(message, depth: int = 0):
    """Set every field of `message` (repeated and map fields to two entries), recursively."""
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key_fd, value_fd = (
                fd.message_type.fields_by_name["key"],
                fd.message_type.fields_by_name["value"],
            )
            for i in range(2):
                key = _scalar(key_fd, i)
                if value_fd.message_type is not None:
                    fill(value[key], depth + 1)
                else:
                    value[key] = _scalar(value_fd, i)
        elif fd.is_repeated:
            for i in range(2):
                if fd.message_type is not None:
                    fill(value.add(), depth + 1)
                else:
                    value.append(_scalar(fd, i))
        elif fd.message_type is not None:
            fill(value, depth + 1)
        else:
            setattr(message, fd.name, _scalar(fd, 0))
    return message


def _dataclass_of(proto_cls):
    return next(dc for dc, p in PAIRS if p is proto_cls)


@pytest.mark.parametrize("dc, proto", PAIRS, ids=[p.DESCRIPTOR.name for _, p in PAIRS])
def test_dataclass_fields_are_the_proto_fields(dc, proto):
    got = [f.name for f in dataclasses.fields(dc)]
    want = [f.name for f in proto.DESCRIPTOR.fields]
    assert sorted(got) == sorted(want), f"{dc.__name__} vs {proto.DESCRIPTOR.full_name}"
    assert hasattr(dc, "__slots__")


def test_every_nested_message_has_a_dataclass():
    """A message field added to any of them (a new nested message) needs its dataclass too."""
    known = {p.DESCRIPTOR.full_name for _, p in PAIRS}
    flattened = {
        "splitserve.common.v1.TokenIdSequence",
        "splitserve.worker.v1.PromptLogprobs",
        "splitserve.worker.v1.LoRAKey",  # (name, load number) tuples
        "splitserve.worker.v1.LoRASlot",  # ((name, load number), slot) tuples
        "splitserve.worker.v1.StateSnapshot",  # (request id, slot) tuples
    }
    for _, proto in PAIRS:
        for fd in proto.DESCRIPTOR.fields:
            mt = fd.message_type
            if mt is None:
                continue
            if mt.GetOptions().map_entry:
                mt = mt.fields_by_name["value"].message_type
                if mt is None:
                    continue
            assert mt.full_name in known | flattened, f"{proto.DESCRIPTOR.name}.{fd.name}"


@pytest.mark.parametrize(
    "proto_cls, from_proto, to_proto",
    ROUND_TRIPS,
    ids=[p.DESCRIPTOR.name for p, _, _ in ROUND_TRIPS],
)
def test_every_field_round_trips(proto_cls, from_proto, to_proto):
    full = fill(proto_cls())
    value = from_proto(full)
    assert isinstance(value, _dataclass_of(proto_cls))
    back = to_proto(value)
    assert back == full, f"lost in the round trip: {_diff(full, back)}"
    # And from the dataclass side: the same value again.
    assert from_proto(back) == value


def test_every_field_round_trips_empty():
    for proto_cls, from_proto, to_proto in ROUND_TRIPS:
        assert to_proto(from_proto(proto_cls())) == proto_cls(), proto_cls.DESCRIPTOR.name
        assert from_proto(proto_cls()) == _dataclass_of(proto_cls)()


def _diff(a, b) -> list[str]:
    return [fd.name for fd in a.DESCRIPTOR.fields if getattr(a, fd.name) != getattr(b, fd.name)]


def test_optional_fields_keep_presence():
    """A proto3 `optional` field set to its zero value is set, not absent (temperature 0 is
    greedy, unset is 1): None only when unset."""
    p = common_pb2.SamplingParams(temperature=0.0, top_k=0, ignore_eos=False, logprobs=0)
    sp = conv.sampling_params_from_proto(p)
    assert (sp.temperature, sp.top_k, sp.ignore_eos, sp.logprobs) == (0.0, 0, False, 0)
    assert sp.top_p is None and sp.seed is None and sp.max_tokens is None
    back = conv.sampling_params_to_proto(sp)
    assert back.HasField("temperature") and back.HasField("logprobs")
    assert not back.HasField("top_p") and not back.HasField("max_tokens")
    r = scheduler_pb2.GenerateRequest(request_id="x", dimensions=0, normalize=False)
    g = conv.generate_request_from_proto(r)
    assert (g.dimensions, g.normalize, g.grammar, g.compiled_grammar) == (0, False, None, None)
    assert conv.generate_request_to_proto(g) == r


def test_step_result_logprobs_entries():
    """None (a request that did not ask) is an empty entry on the wire; no entries at all when
    nobody asked."""
    lp = msg.TokenLogprobs(7, -0.25, 1, [7, 3], [-0.25, -2.0])
    r = msg.StepResult(step_id=4, request_ids=["a", "b"], token_ids=[7, 9], logprobs=[lp, None])
    p = conv.step_result_to_proto(r)
    assert len(p.logprobs) == 2 and p.logprobs[1] == common_pb2.TokenLogprobs()
    assert conv.step_result_from_proto(p) == r
    bare = msg.StepResult(step_id=5, request_ids=["a"], token_ids=[1])
    assert len(conv.step_result_to_proto(bare).logprobs) == 0
    assert conv.step_result_from_proto(conv.step_result_to_proto(bare)) == bare


def test_a_full_step_round_trips_from_the_dataclass_side():
    """What the scheduler plans (grammar handle, spec, images, LoRA ids, trace context,
    presence fields) reaches the worker as it was."""
    sp = msg.SamplingParams(
        temperature=0.0,
        seed=11,
        max_tokens=5,
        stop_token_ids=[2],
        logit_bias={4: -1.5},
        bad_words_token_ids=[[5, 6], [7]],
        allowed_token_ids=[1, 2, 3],
        logprobs=2,
    )
    image = msg.MultiModalInput(
        "image", msg.TensorData("float32", [3, 1, 1], b"\0" * 12), b"h" * 32, 1, 4
    )
    step = msg.StepRequest(
        step_id=9,
        new_requests=[
            msg.NewRequest(
                request_id="n",
                token_ids=[1, 2, 3],
                sampling_params=sp,
                block_ids=[0, 1],
                num_computed_tokens=1,
                num_prompt_tokens=3,
                grammar=msg.CompiledGrammar("abc", "xgrammar", b"\x01\x02"),
                trace_context={"traceparent": "00-1-2-01"},
                lora_name="ad",
                lora_path="/loras/ad",
                lora_int_id=2**40,
                mm_inputs=[image],
            ),
            msg.NewRequest(
                request_id="s", token_ids=[4], grammar_spec=msg.GrammarSpec("regex", "[a-z]+")
            ),
        ],
        cached_requests=[msg.CachedRequest("c", [5], 17, [8, 9])],
        num_scheduled_tokens={"n": 2, "s": 1, "c": 1},
        finished_request_ids=["gone"],
    )
    assert conv.step_request_from_proto(conv.step_request_to_proto(step)) == step
    result = msg.StepResult(
        step_id=9,
        request_ids=["n"],
        token_ids=[3],
        logprobs=[msg.TokenLogprobs(3, -0.5, 2, [1, 3], [-0.125, -0.5])],
        prompt_logprobs={"n": [msg.TokenLogprobs(2, -1.0, 4, [], [])]},
        errors={"s": "bad grammar"},
        grammar_terminated_ids=["n"],
        deferred_request_ids=["c"],
        pooled=[msg.PooledOutput("p", [0.5, 0.25])],
    )
    assert conv.step_result_from_proto(conv.step_result_to_proto(result)) == result


def test_the_messages_module_needs_neither_protobuf_nor_torch():
    code = (
        "import sys; import splitserve.common.messages; "
        "bad = [m for m in ('torch', 'google.protobuf') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
