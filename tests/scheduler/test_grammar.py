"""Structured outputs in the scheduler (torch-free): the compiled grammar travels to the
workers with the request (again on resume after a preemption), a terminated grammar finishes
the request with STOP, and over gRPC the scheduler compiles nothing and calls no tokenizer
service: a compiled constraint (the gateway's) goes to the workers as it came, a spec (a direct
caller's) goes as a spec for the sampling rank to compile, and both at once are refused.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from splitserve.common import messages as msg
from splitserve.protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.server import run_scheduler

from .fake_worker import FakeWorkerExecutor
from .test_server import free_port, wait_for
from .utils import gen_request, gen_request_proto, make_engine, prompts, run_to_completion

STOP = common_pb2.FinishReason.FINISH_REASON_STOP
LENGTH = common_pb2.FinishReason.FINISH_REASON_LENGTH


def grammar(tag: str) -> msg.CompiledGrammar:
    return msg.CompiledGrammar(handle=f"h-{tag}", backend="xgrammar", compiled=tag.encode())


def grammar_proto(tag: str) -> common_pb2.CompiledGrammar:
    return common_pb2.CompiledGrammar(handle=f"h-{tag}", backend="xgrammar", compiled=tag.encode())


def test_grammar_goes_to_the_worker_and_its_end_stops_the_request():
    engine, worker = make_engine(num_blocks=64)
    engine.scheduler.add_request(gen_request("g", [5, 6, 7], max_tokens=20), grammar("g"))
    engine.scheduler.add_request(gen_request("plain", [8, 9], max_tokens=6))
    worker.grammar_ends_after["g"] = 4
    idle = engine.scheduler.kv.num_free_blocks
    outs = run_to_completion(engine)
    assert outs["g"] == (outs["g"][0], STOP) and len(outs["g"][0]) == 4
    assert outs["plain"][1] == LENGTH and len(outs["plain"][0]) == 6
    assert worker.grammars_seen == {"g": [b"g"], "plain": [b""]}
    assert engine.scheduler.kv.num_free_blocks == idle


def test_grammar_is_resent_when_a_preempted_request_resumes():
    engine, worker = make_engine(num_blocks=12, block_size=4)
    ps = prompts(4, lo=6, hi=10, seed=3)
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p, max_tokens=24), grammar(f"r{i}"))
    outs = run_to_completion(engine)
    assert engine.scheduler.num_preemptions > 0
    resent = {rid: seen for rid, seen in worker.grammars_seen.items() if len(seen) > 1}
    assert resent, "no request was preempted and resumed"
    for rid, seen in worker.grammars_seen.items():
        assert seen == [rid.encode()] * len(seen)
    assert all(len(toks) == 24 for toks, _ in outs.values())


@pytest.fixture(scope="module")
def stack():
    addr = f"127.0.0.1:{free_port()}"
    config = SchedulerConfig(block_size=4, max_model_len=512)  # no tokenizer service anywhere
    worker = FakeWorkerExecutor(64, max_model_len=1024)
    loop = asyncio.new_event_loop()
    task = loop.create_task(run_scheduler(config, addr, executor_factory=lambda: worker))

    def run():
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    channel = grpc.insecure_channel(addr)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    def ready():
        try:
            stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False

    wait_for(ready, what="scheduler ready")
    yield stub, worker
    channel.close()
    loop.call_soon_threadsafe(task.cancel)
    thread.join(10)


def constrained(rid: str, regex: str) -> scheduler_pb2.GenerateRequest:
    req = gen_request_proto(rid, [5, 6, 7], max_tokens=3)
    req.grammar.CopyFrom(common_pb2.GrammarSpec(kind="regex", spec=regex))
    return req


def test_a_compiled_constraint_goes_to_the_worker_as_it_came(stack):
    stub, worker = stack
    req = gen_request_proto("compiled", [5, 6, 7], max_tokens=3)
    req.compiled_grammar.CopyFrom(grammar_proto("compiled"))
    outs = list(stub.Generate(req, timeout=10))
    assert outs[-1].finish_reason == LENGTH
    assert worker.grammars_seen["compiled"] == [b"compiled"]
    assert "compiled" not in worker.grammar_specs_seen


def test_a_spec_goes_to_the_worker_uncompiled(stack):
    stub, worker = stack
    outs = list(stub.Generate(constrained("spec", "[a-z]+"), timeout=10))
    assert outs[-1].finish_reason == LENGTH
    (seen,) = worker.grammar_specs_seen["spec"]
    assert seen == msg.GrammarSpec(kind="regex", spec="[a-z]+")
    assert worker.grammars_seen["spec"] == [b""]
    plain = list(stub.Generate(gen_request_proto("plain", [5, 6], max_tokens=2), timeout=10))
    assert plain[-1].finish_reason == LENGTH
    assert "plain" not in worker.grammar_specs_seen and worker.grammars_seen["plain"] == [b""]


def test_both_forms_at_once_are_refused_before_the_engine_sees_them(stack):
    stub, worker = stack
    before = stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    req = constrained("both", "[a-z]+")
    req.compiled_grammar.CopyFrom(grammar_proto("both"))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(req, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not both" in info.value.details()
    after = stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    assert after.num_steps == before.num_steps and after.num_waiting == 0
    assert "both" not in worker.grammars_seen


def test_the_scheduler_has_no_tokenizer_client():
    """No CompileGrammar call can come from the scheduler: it has no tokenizer address to
    call, and the tokenizer service has no CompileGrammar RPC left to call."""
    import dataclasses

    from splitserve.protos import tokenizer_pb2
    from splitserve.scheduler import server

    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    assert not {"tokenizer_address", "grammar_compile_deadline_s"} & fields
    with pytest.raises(TypeError):
        SchedulerConfig(tokenizer_address="127.0.0.1:1")
    assert not hasattr(server, "GrammarClient")
    methods = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].methods_by_name
    assert "CompileGrammar" not in methods and "Prepare" in methods
