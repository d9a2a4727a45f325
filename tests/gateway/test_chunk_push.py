"""Tokens written from the output router's task (`ChunkWriter.push` through the group's
sink) instead of waking each stream's task: same chunks, same order, a slow client's send
finished later but never overtaken, errors still reach the stream."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from splitserve.gateway.generation import SequenceDelta, SequenceGroup
from splitserve.gateway.streaming import DIRECT_SEND, ChunkWriter, SSEResponse

from .fakes import SCRIPT
from .test_completions import sse_events


class _Sends:
    """An ASGI send that records bodies; while `gate` is set it waits on it first (a
    connection whose write buffer is full), as uvicorn's send waits for the transport."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def __call__(self, message: dict) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.bodies.append(message["body"])
        assert message["more_body"] is True


def _attached() -> tuple[_Sends, ChunkWriter]:
    sends = _Sends()
    writer = ChunkWriter()
    writer.attach(sends)
    return sends, writer


def test_pushes_go_out_as_one_write_at_the_loops_next_turn():
    async def main() -> None:
        sends = _Sends()
        writer = ChunkWriter()
        assert not writer.ready  # not attached: nothing may be pushed yet
        writer.attach(sends)
        assert writer.ready
        writer.push("data: 1\n\n")
        writer.push("data: 2\n\n")  # a batch with two tokens of the stream: one write
        assert sends.bodies == []
        await asyncio.sleep(0)
        assert sends.bodies == [b"data: 1\n\ndata: 2\n\n"]
        writer.push("data: 3\n\n")
        await writer.send("data: 4\n\n")  # what is pushed goes first
        assert sends.bodies[1:] == [b"data: 3\n\n", b"data: 4\n\n"]
        await asyncio.sleep(0)
        assert len(sends.bodies) == 3  # the scheduled write found nothing left

    asyncio.run(main())


def test_every_stream_pushed_in_a_turn_is_written_in_the_next():
    async def main() -> None:
        sends = [_Sends() for _ in range(3)]
        writers = [ChunkWriter() for _ in sends]
        for writer, send in zip(writers, sends, strict=True):
            writer.attach(send)
        for round_ in range(2):
            for k, writer in enumerate(writers):
                writer.push(f"data: {round_}-{k}\n\n")
            writers[1].push(f"data: {round_}-1b\n\n")
            await asyncio.sleep(0)
        assert [s.bodies for s in sends] == [
            [b"data: 0-0\n\n", b"data: 1-0\n\n"],
            [b"data: 0-1\n\ndata: 0-1b\n\n", b"data: 1-1\n\ndata: 1-1b\n\n"],
            [b"data: 0-2\n\n", b"data: 1-2\n\n"],
        ]

    asyncio.run(main())


def test_a_push_that_must_wait_finishes_later_and_is_not_overtaken():
    async def main() -> None:
        sends, writer = _attached()
        sends.gate = asyncio.Event()
        writer.push("data: 1\n\n")
        await asyncio.sleep(0)
        assert sends.bodies == [] and not writer.ready  # it waits: later chunks must too
        later = asyncio.ensure_future(writer.send("data: 2\n\n"))
        await asyncio.sleep(0)
        assert sends.bodies == [] and not later.done()
        sends.gate.set()
        await later
        assert sends.bodies == [b"data: 1\n\n", b"data: 2\n\n"]
        assert writer.ready

    asyncio.run(main())


def test_an_error_of_a_pushed_send_is_raised_by_the_next_send():
    async def main() -> None:
        sends, writer = _attached()
        sends.fail = RuntimeError("transport broke")
        writer.push("data: 1\n\n")
        await asyncio.sleep(0)
        assert not writer.ready
        with pytest.raises(RuntimeError, match="transport broke"):
            await writer.send("data: 2\n\n")

    asyncio.run(main())


def test_close_drops_a_pushed_send_still_waiting():
    async def main() -> None:
        sends, writer = _attached()
        sends.gate = asyncio.Event()
        writer.push("data: 1\n\n")
        await asyncio.sleep(0)
        writer.close()
        await asyncio.sleep(0)
        sends.gate.set()
        await asyncio.sleep(0)
        assert sends.bodies == []

    asyncio.run(main())


def _delta(text: str, finish: str | None = None) -> SequenceDelta:
    return SequenceDelta(text, [1], [], 3, None, finish)


class _Clients:
    router = None


def _group(n: int) -> SequenceGroup:
    group = SequenceGroup(_Clients(), [], None)  # no sequences run: the test feeds its queue
    group._live = n
    return group


def test_the_sink_takes_deltas_while_the_consumer_waits_and_declines_finishes_and_errors():
    async def main() -> None:
        group = _group(2)
        taken: list[tuple] = []

        def sink(item: tuple) -> tuple | None:
            index, delta, exc = item
            if exc is not None or delta.finish_reason is not None:
                return item
            taken.append((index, delta.text))
            return None

        waiting = asyncio.ensure_future(group.next(sink))
        await asyncio.sleep(0)
        put = group._queue.put_nowait
        put((0, _delta("a"), None))
        put((1, _delta("b"), None))
        assert taken == [(0, "a"), (1, "b")] and not waiting.done()  # no wake-up
        put((0, _delta("c", "length"), None))  # a last delta: the consumer gets it
        put((1, _delta("d"), None))  # queued behind it, not taken out of order
        assert taken == [(0, "a"), (1, "b")]
        index, delta = await waiting
        assert (index, delta.text, delta.finish_reason) == (0, "c", "length")
        assert group.poll()[1].text == "d"
        assert group._queue.sink is None
        err = asyncio.ensure_future(group.next(sink))
        await asyncio.sleep(0)
        put((1, None, ValueError("engine error")))
        with pytest.raises(ValueError, match="engine error"):
            await err

    asyncio.run(main())


def test_sse_response_pushed_chunks_keep_their_order_with_yielded_ones():
    """The body yields some chunks and pushes others (as `_sse_body` does): the client gets
    them in the order they were produced, the end message last."""
    chain: list[dict] = []
    direct = _Sends()

    async def main() -> None:
        writer = ChunkWriter()

        async def body():
            yield "data: 1\n\n"
            writer.push("data: 2\n\n")
            writer.push("data: 3\n\n")
            direct.gate = asyncio.Event()  # their write must wait
            await asyncio.sleep(0)
            assert not writer.ready
            asyncio.get_running_loop().call_later(0.01, direct.gate.set)
            yield "data: 4\n\n"

        async def to_chain(message):
            chain.append(message)

        async def never_disconnects():
            await asyncio.Event().wait()

        async def on_close() -> None:
            pass

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}, DIRECT_SEND: direct}
        await SSEResponse(body(), on_close, writer)(scope, never_disconnects, to_chain)

    asyncio.run(main())
    assert direct.bodies == [b"data: 1\n\n", b"data: 2\n\ndata: 3\n\n", b"data: 4\n\n"]
    assert [m["type"] for m in chain] == ["http.response.start", "http.response.body"]
    assert chain[1]["more_body"] is False


def test_a_stream_through_the_gateway_pushes_tokens_and_sends_every_one(http, monkeypatch):
    """Tokens that arrive while the stream waits are written from the router's task, and
    the client still gets one event per token, in order, then the usage chunk and [DONE]."""
    pushed: list[str] = []
    real_push = ChunkWriter.push

    def counting_push(self, chunk: str) -> None:
        pushed.append(chunk)
        real_push(self, chunk)

    monkeypatch.setattr(ChunkWriter, "push", counting_push)
    r = http.post(
        "/v1/completions",
        json={
            "prompt": f"#slow {uuid.uuid4().hex[:8]}",
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(r.text)
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert "".join(texts) == SCRIPT[:8] and len(texts) == 8  # one event per token
    assert events[-1]["usage"]["completion_tokens"] == 8
    assert pushed, "no token went out through the push path"
    assert all(p in r.text for p in pushed)
