"""bench/stack_overhead.py's LeanClient against a loopback server with known responses:
chunked framing cut at every awkward place, keep-alive reuse, and the failures it must see."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import pathlib

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "stack_overhead.py"


def _load_bench():
    # NOTE: loaded from its file: bench/ is no package and never goes on sys.path.
    spec = importlib.util.spec_from_file_location("stack_overhead_bench", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _events(tokens: int, usage_tokens: int | None = None, finish: str = "length") -> bytes:
    out = []
    for i in range(tokens):
        choice = {"index": 0, "text": f"t{i}", "logprobs": None}
        choice["finish_reason"] = finish if i == tokens - 1 else None
        choice["stop_reason"] = None
        out.append({"id": "cmpl-1", "choices": [choice], "usage": None})
    usage = tokens if usage_tokens is None else usage_tokens
    out.append({"id": "cmpl-1", "choices": [], "usage": {"completion_tokens": usage}})
    body = "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in out)
    return (body + "data: [DONE]\n\n").encode()


def _chunked(body: bytes, sizes: list[int], trailer: bytes = b"") -> bytes:
    """`body` as chunks of the given sizes (cycled), with a chunk extension on the first."""
    out, pos, k = [], 0, 0
    while pos < len(body):
        size = sizes[k % len(sizes)]
        piece = body[pos : pos + size]
        ext = b";name=value" if k == 0 else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), ext, piece))
        pos += size
        k += 1
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


class _Server:
    """Answers each request on a connection with the next canned response, written in
    `write_sizes` pieces (so reads split the framing anywhere)."""

    def __init__(self, responses: list[bytes], write_sizes: list[int]) -> None:
        self.responses = responses
        self.write_sizes = write_sizes
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.responses:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                data = self.responses.pop(0)
                pos, k = 0, 0
                while pos < len(data):
                    size = self.write_sizes[k % len(self.write_sizes)]
                    writer.write(data[pos : pos + size])
                    await writer.drain()
                    await asyncio.sleep(0)
                    pos += size
                    k += 1
        except asyncio.IncompleteReadError:
            pass  # the client closed the connection: nothing more to answer
        finally:
            writer.close()


def _ok(body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n" + headers + b"\r\n" + body
    )


async def _with_server(server: _Server, work):
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    client = bench.LeanClient("127.0.0.1", port)
    try:
        return await work(client)
    finally:
        await client.close()
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize("write_sizes", [[1], [3, 7], [4096], [17, 1, 2, 300]])
@pytest.mark.parametrize("chunk_sizes", [[1000000], [5], [13, 2, 64]])
def test_counts_a_known_stream_however_it_is_cut(write_sizes, chunk_sizes):
    body = _events(9)
    responses = [
        _ok(_chunked(body, chunk_sizes)),
        _ok(_chunked(body, chunk_sizes, trailer=b"X-Trailer: 1\r\n")),
    ]
    server = _Server(responses, write_sizes)

    async def work(client):
        return [await client.stream("/v1/completions", b'{"a":1}') for _ in range(2)]

    results = asyncio.run(_with_server(server, work))
    for res in results:
        assert res.status == 200
        assert res.text_events == 9
        assert res.finish_reasons == ["length"]
        assert res.usage == {"completion_tokens": 9}
        assert res.done
        assert res.first_token_s > 0
    assert server.connections == 1, "the second request did not reuse the connection"
    assert server.requests[0].startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert server.requests[0].endswith(b'Content-Length: 7\r\n\r\n{"a":1}')


def test_non_200_raises_with_the_body():
    error = b'{"error":{"message":"no"}}'
    response = (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(error), error)
    )
    server = _Server([response], [5])

    async def work(client):
        return await client.stream("/v1/completions", b"{}")

    with pytest.raises(bench.HTTPStatusError, match="HTTP 400.*no"):
        asyncio.run(_with_server(server, work))


def test_a_cut_stream_raises():
    full = _ok(_chunked(_events(3), [40]))
    server = _Server([full[: len(full) - 30]], [4096])

    async def work(client):
        return await client.stream("/v1/completions", b"{}")

    with pytest.raises(ConnectionError):
        asyncio.run(_with_server(server, work))


def test_bad_chunk_framing_raises():
    broken = _ok(b"5\r\nabcdefg\r\n0\r\n\r\n")  # 7 bytes where the size says 5
    server = _Server([broken], [4096])

    async def work(client):
        return await client.stream("/v1/completions", b"{}")

    with pytest.raises(ValueError, match="CRLF"):
        asyncio.run(_with_server(server, work))


def test_an_error_event_raises():
    body = b'data: {"error":{"message":"engine died"}}\n\ndata: [DONE]\n\n'
    server = _Server([_ok(_chunked(body, [64]))], [4096])

    async def work(client):
        return await client.stream("/v1/completions", b"{}")

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(_with_server(server, work))


def test_connection_close_is_not_reused():
    body = _chunked(_events(2), [30])
    server = _Server([_ok(body, b"Connection: close\r\n")], [4096])

    async def work(client):
        first = await client.stream("/v1/completions", b"{}")
        return first, len(client._idle)

    first, idle = asyncio.run(_with_server(server, work))
    assert first.text_events == 2 and first.done
    assert idle == 0
