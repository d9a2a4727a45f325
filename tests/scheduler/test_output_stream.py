"""The batched output path: StreamOutputs (one message per step for a front end), Submit and
SubmitStream."""

from __future__ import annotations

import threading

import grpc
import pytest

from splitserve.protos import scheduler_pb2

from .test_server import NUM_BLOCKS, scheduler_addr, stats, stub, wait_for  # noqa: F401
from .utils import gen_request_proto


class Reader:
    """Reads a StreamOutputs call on a thread, keeping every batch."""

    def __init__(self, client, stream_id: str, heartbeat_interval_s: float = 0.0) -> None:
        self.call = client.StreamOutputs(
            scheduler_pb2.StreamOutputsRequest(
                stream_id=stream_id, heartbeat_interval_s=heartbeat_interval_s
            )
        )
        first = next(self.call)
        assert not first.outputs  # the "registered" message
        self.batches: list[scheduler_pb2.OutputBatch] = []
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for batch in self.call:
                self.batches.append(batch)
        except grpc.RpcError as exc:
            self.error = exc

    def outputs(self, rid: str) -> list[scheduler_pb2.GenerateResponse]:
        return [e.output for b in list(self.batches) for e in b.outputs if e.request_id == rid]

    def finished(self, rid: str) -> bool:
        return any(o.finish_reason for o in self.outputs(rid))


def submit(client, stream_id: str, req: scheduler_pb2.GenerateRequest) -> None:
    client.Submit(scheduler_pb2.SubmitRequest(stream_id=stream_id, request=req))


def test_one_message_per_step_for_all_requests_of_a_stream(stub):  # noqa: F811
    steps_before = stats(stub).num_steps
    reader = Reader(stub, "gw-batch")
    lengths = {"s1": 30, "s2": 31, "s3": 32}
    for rid, n in lengths.items():
        submit(stub, "gw-batch", gen_request_proto(rid, [5, 6, 7], n))
    wait_for(lambda: all(reader.finished(r) for r in lengths), what="all requests finished")
    steps = stats(stub).num_steps - steps_before
    for rid, n in lengths.items():
        outs = reader.outputs(rid)
        assert sum(len(o.token_ids) for o in outs) == n
        assert outs[-1].finish_reason == 2 and outs[0].num_prompt_tokens == 3
        assert [o.HasField("queue_time_s") for o in outs if o.token_ids][0]
    batches = [b for b in reader.batches if b.outputs]
    # NOTE: the property this path exists for: a message per step, not per request per step.
    assert len(batches) <= steps
    assert max(len({e.request_id for e in b.outputs}) for b in batches) == 3
    reader.call.cancel()
    wait_for(lambda: stats(stub).num_free_blocks == NUM_BLOCKS, what="blocks free")


def test_closing_the_stream_aborts_its_requests(stub):  # noqa: F811
    reader = Reader(stub, "gw-close")
    submit(stub, "gw-close", gen_request_proto("long1", list(range(5, 40)), 400))
    submit(stub, "gw-close", gen_request_proto("long2", list(range(5, 40)), 400))
    wait_for(lambda: reader.outputs("long1") and reader.outputs("long2"), what="first tokens")
    assert stats(stub).num_free_blocks < NUM_BLOCKS
    reader.call.cancel()
    wait_for(
        lambda: stats(stub).num_free_blocks == NUM_BLOCKS and stats(stub).num_running == 0,
        what="blocks freed after the stream closed",
    )
    # The id is free again once closed.
    Reader(stub, "gw-close").call.cancel()


def test_abort_ends_one_request_and_spares_the_others(stub):  # noqa: F811
    reader = Reader(stub, "gw-abort")
    submit(stub, "gw-abort", gen_request_proto("ab1", [5, 6, 7], 400))
    submit(stub, "gw-abort", gen_request_proto("ab2", [5, 6, 7], 40))
    wait_for(lambda: reader.outputs("ab1"), what="first token")
    assert stub.Abort(scheduler_pb2.AbortRequest(request_id="ab1")).aborted
    wait_for(lambda: reader.finished("ab2"), what="the other request finished")
    assert sum(len(o.token_ids) for o in reader.outputs("ab2")) == 40
    wait_for(lambda: stats(stub).num_free_blocks == NUM_BLOCKS, what="blocks freed")
    assert not reader.finished("ab1")
    reader.call.cancel()


def test_submit_refusals_keep_generate_status_codes(stub):  # noqa: F811
    with pytest.raises(grpc.RpcError) as e:
        submit(stub, "no-such-stream", gen_request_proto("x1", [5, 6], 2))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no open output stream" in e.value.details()
    reader = Reader(stub, "gw-bad")
    with pytest.raises(grpc.RpcError) as e:
        submit(stub, "gw-bad", gen_request_proto("b1", list(range(5, 500)), 100))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "495" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.StreamOutputs(scheduler_pb2.StreamOutputsRequest(stream_id="gw-bad")).next()
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    submit(stub, "gw-bad", gen_request_proto("ok1", [5, 6], 3))
    wait_for(lambda: reader.finished("ok1"), what="a good request after refusals")
    assert not reader.outputs("b1")
    reader.call.cancel()


def test_submit_stream_queues_each_message_and_refuses_as_error_outputs(stub):  # noqa: F811
    reader = Reader(stub, "gw-substream")
    messages = [
        ("gw-substream", gen_request_proto("ss1", [5, 6, 7], 60)),
        # A stream that is not open: dropped, and the call goes on.
        ("no-such-stream", gen_request_proto("ss-lost", [5, 6], 2)),
        # Submit's refusal (INVALID_ARGUMENT, prompt + max_tokens too long), as an output.
        ("gw-substream", gen_request_proto("ss-bad", list(range(5, 500)), 100)),
        ("gw-substream", gen_request_proto("ss2", [8, 9], 4)),
        # A running id again (60 tokens take longer than these messages): ALREADY_EXISTS, as
        # the duplicate's output.
        ("gw-substream", gen_request_proto("ss1", [5, 6, 7], 6)),
    ]
    answer = stub.SubmitStream(
        scheduler_pb2.SubmitRequest(stream_id=sid, request=req) for sid, req in messages
    )
    assert answer == scheduler_pb2.SubmitResponse()
    wait_for(
        lambda: reader.finished("ss2") and reader.finished("ss-bad"), what="outputs and refusal"
    )
    wait_for(lambda: len([o for o in reader.outputs("ss1") if o.finish_reason]) == 2, what="ss1")
    bad = [e for b in reader.batches for e in b.outputs if e.request_id == "ss-bad"]
    assert len(bad) == 1 and bad[0].error_code == "INVALID_ARGUMENT"
    assert "495" in bad[0].output.error and bad[0].output.finish_reason == 4  # ERROR
    dup = [e for b in reader.batches for e in b.outputs if e.request_id == "ss1" and e.error_code]
    assert len(dup) == 1 and dup[0].error_code == "ALREADY_EXISTS"
    ss1 = [o for o in reader.outputs("ss1") if not o.error]
    assert sum(len(o.token_ids) for o in ss1) == 60 and ss1[-1].finish_reason == 2
    assert sum(len(o.token_ids) for o in reader.outputs("ss2")) == 4
    assert not reader.outputs("ss-lost")
    reader.call.cancel()
    wait_for(lambda: stats(stub).num_free_blocks == NUM_BLOCKS, what="blocks free")


def test_submit_stream_fails_only_the_request_a_bug_hits(stub, monkeypatch):  # noqa: F811
    from splitserve.scheduler import server

    real = server.generate_request_from_proto

    def convert(request):
        if request.request_id == "bug1":
            raise KeyError("a bug")
        return real(request)

    monkeypatch.setattr(server, "generate_request_from_proto", convert)
    reader = Reader(stub, "gw-bug")
    messages = [
        gen_request_proto("bug1", [5, 6], 3),
        gen_request_proto("after-bug", [5, 6], 3),
    ]
    stub.SubmitStream(scheduler_pb2.SubmitRequest(stream_id="gw-bug", request=r) for r in messages)
    wait_for(lambda: reader.finished("after-bug") and reader.finished("bug1"), what="both ended")
    bug = [e for b in reader.batches for e in b.outputs if e.request_id == "bug1"]
    assert len(bug) == 1 and bug[0].error_code == "INTERNAL" and "a bug" in bug[0].output.error
    assert sum(len(o.token_ids) for o in reader.outputs("after-bug")) == 3
    reader.call.cancel()


def test_a_quiet_stream_carries_heartbeats_only_when_asked(stub):  # noqa: F811
    quiet = Reader(stub, "gw-quiet")
    beating = Reader(stub, "gw-heartbeats", heartbeat_interval_s=0.1)
    # Empty batches keep coming while nothing runs: the gateway tells a quiet scheduler
    # from a stalled one by them (--rpc-timeout-s).
    wait_for(lambda: len(beating.batches) >= 3, what="three heartbeats")
    assert all(not b.outputs for b in beating.batches)
    submit(stub, "gw-heartbeats", gen_request_proto("hb1", [5, 6, 7], 4))
    wait_for(lambda: beating.finished("hb1"), what="the request on a heartbeat stream")
    assert sum(len(o.token_ids) for o in beating.outputs("hb1")) == 4
    assert quiet.batches == []  # none asked for, none sent
    quiet.call.cancel()
    beating.call.cancel()
