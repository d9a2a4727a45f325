"""Structured outputs in the scheduler (torch-free): the compiled grammar travels to the
workers with the request (again on resume after a preemption), a terminated grammar finishes
the request with STOP, and over gRPC a constraint is compiled through the tokenizer service
before queueing: a bad one is refused with INVALID_ARGUMENT and the engine never sees it.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest

from splitserve.protos import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.server import run_scheduler

from .fake_worker import FakeWorkerExecutor
from .test_server import free_port, wait_for
from .utils import gen_request, make_engine, prompts, run_to_completion

STOP = common_pb2.FinishReason.FINISH_REASON_STOP
LENGTH = common_pb2.FinishReason.FINISH_REASON_LENGTH


def grammar(tag: str) -> common_pb2.CompiledGrammar:
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


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """Stands in for the tokenizer service's CompileGrammar: regex "(" is refused."""

    def __init__(self) -> None:
        self.calls: list[tokenizer_pb2.CompileGrammarRequest] = []

    def CompileGrammar(self, request, context):
        self.calls.append(request)
        if request.grammar.spec == "(":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid regex: unclosed group")
        compiled = request.grammar.spec.encode() if request.include_compiled else b""
        return tokenizer_pb2.CompileGrammarResponse(
            grammar=common_pb2.CompiledGrammar(handle="h", backend="xgrammar", compiled=compiled)
        )


@pytest.fixture(scope="module")
def stack():
    tok_server = grpc.server(futures.ThreadPoolExecutor(2))
    fake_tok = FakeTokenizer()
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(fake_tok, tok_server)
    tok_addr = f"127.0.0.1:{tok_server.add_insecure_port('127.0.0.1:0')}"
    tok_server.start()
    addr = f"127.0.0.1:{free_port()}"
    config = SchedulerConfig(block_size=4, max_model_len=512, tokenizer_address=tok_addr)
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
    yield stub, fake_tok, worker
    channel.close()
    loop.call_soon_threadsafe(task.cancel)
    thread.join(10)
    tok_server.stop(0)


def constrained(rid: str, regex: str) -> scheduler_pb2.GenerateRequest:
    req = gen_request(rid, [5, 6, 7], max_tokens=3)
    req.grammar.CopyFrom(common_pb2.GrammarSpec(kind="regex", spec=regex))
    return req


def test_bad_constraint_is_refused_before_the_engine_sees_it(stack):
    stub, fake_tok, worker = stack
    before = stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(constrained("bad", "("), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unclosed group" in info.value.details()
    after = stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    assert after.num_steps == before.num_steps and after.num_waiting == 0
    assert "bad" not in worker.grammars_seen


def test_constraint_is_compiled_with_its_bytes_and_sent_to_the_worker(stack):
    stub, fake_tok, worker = stack
    n = len(fake_tok.calls)
    outs = list(stub.Generate(constrained("good", "[a-z]+"), timeout=10))
    assert outs[-1].finish_reason == LENGTH
    call = fake_tok.calls[n]
    assert call.include_compiled and call.grammar.spec == "[a-z]+"
    assert worker.grammars_seen["good"] == [b"[a-z]+"]
    plain = list(stub.Generate(gen_request("plain", [5, 6], max_tokens=2), timeout=10))
    assert plain[-1].finish_reason == LENGTH
    assert len(fake_tok.calls) == n + 1  # a request without a constraint costs no call


def test_without_a_tokenizer_address_a_constraint_is_refused():
    from splitserve.scheduler.server import GrammarClient

    class Context:
        async def abort(self, code, details):
            raise grpc.RpcError(code, details)

    with pytest.raises(grpc.RpcError) as info:
        asyncio.run(GrammarClient(None, 5).compile(common_pb2.GrammarSpec(), Context()))
    assert info.value.args == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "structured outputs need the tokenizer service: start the scheduler with "
        "--tokenizer-address",
    )
