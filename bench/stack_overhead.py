"""What the process split costs per token: the full stack over HTTP vs the in-process engine.

    python bench/stack_overhead.py                   # 256 streams x 128 tokens, 3 rounds
    python bench/stack_overhead.py --rounds 1 --streams 64

A tiny model (2 layers, hidden 64) keeps the model's compute negligible, so what is left is
the per-token cost of everything around it. (a) `splitserve serve` as a subprocess, driven
by `--streams` concurrent streaming /v1/completions requests (`ignore_eos`, `--tokens` each,
prompts given as token ids); (b) `splitserve.LLM` in this process on the
same prompts. The two alternate, `--rounds` times each, after a warm-up of both; every
response must report exactly `--tokens` completion tokens (the stack's from its usage chunk,
the engine's from its token ids). Then time-to-first-token at concurrency 1 (median of
`--ttft-samples` streamed 1-token requests; the engine's is one `generate` of 1 token).
Prints tok/s of each round, the medians, their ratio a/b and the TTFT difference, and the CPU
seconds each process of the stack (and this client) spent in the stack rounds (Linux /proc).

The client shares the machine's cores with the stack, so it is kept lean (`LeanClient`: raw
asyncio streams speaking HTTP/1.1 with keep-alive and chunked transfer encoding; every SSE event
split out and counted, only the finish and usage events decoded). Each stack response must end
with `[DONE]`, one finish reason `length`, and a usage chunk saying `--tokens`. `--client httpx`
measures with async httpx instead (what this script used before; 4-6x the client's CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import random
import signal
import statistics
import subprocess
import sys
import time

from splitserve.entrypoints.launcher import free_port

TINY_MODEL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)


def model_folder() -> pathlib.Path:
    from splitserve.testing.demo_model import build_model

    cache = pathlib.Path(
        os.environ.get("SPLITSERVE_CACHE", pathlib.Path.home() / ".cache" / "splitserve")
    )
    path = cache / "stack-overhead-tiny-v1"
    if not (path / "config.json").exists():
        build_model(path, "llama", num_kv_heads=2, **TINY_MODEL)
    return path


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


# ---------------------------------------------------------------- the benchmark's HTTP client
class HTTPStatusError(RuntimeError):
    """A response other than 200 (its status and the start of its body)."""


class StreamResult:
    """What the lean client keeps of one streamed completion."""

    __slots__ = ("status", "first_token_s", "text_events", "finish_reasons", "usage", "done")

    def __init__(self) -> None:
        self.status = 0
        self.first_token_s = float("nan")
        """Seconds from sending the request to the first event with a `"text"` field."""
        self.text_events = 0
        """Events that carry a choice (`"text"`): at most one per token of a 1-choice request."""
        self.finish_reasons: list[str] = []
        self.usage: dict | None = None
        """The usage object of the stream's last JSON event (`stream_options.include_usage`)."""
        self.done = False
        """The stream ended with `data: [DONE]`."""


class _ChunkedBody:
    """Undoes HTTP/1.1 chunked transfer encoding incrementally; `feed` returns body bytes."""

    __slots__ = ("buf", "need", "finished")

    def __init__(self) -> None:
        self.buf = b""
        self.need = -1  # bytes of chunk data still to come (+2 for its CRLF); -1: a size line
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        n = len(buf)
        while not self.finished:
            if self.need == -2:
                if buf.startswith(b"\r\n", pos):  # no trailer fields
                    pos += 2
                    self.finished = True
                    continue
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                pos = end + 4
                self.finished = True
            elif self.need == -1:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self.need = -2  # the trailer section: header lines, then an empty line
                    continue
                self.need = size
            else:
                if n - pos < self.need + 2:
                    if n - pos > self.need:  # all of the data, part of the CRLF
                        break
                    out.append(buf[pos:])
                    self.need -= n - pos
                    pos = n
                    break
                end = pos + self.need
                if buf[end : end + 2] != b"\r\n":
                    raise ValueError(f"chunk data not followed by CRLF: {buf[end : end + 8]!r}")
                out.append(buf[pos:end])
                pos = end + 2
                self.need = -1
        self.buf = buf[pos:]
        return b"".join(out)


class LeanClient:
    """Streaming POSTs over HTTP/1.1 keep-alive connections, parsed in asyncio protocols.

    It exists so that the benchmark's own client costs little of the CPU it shares with the
    stack: no HTTP library, no stream reader (each connection's bytes are parsed where they
    arrive, and a request's coroutine wakes once, when its response is complete), and of the
    SSE stream it parses only what it checks. Every event is split out and counted; only
    events with `"usage"` or a non-null `"finish_reason"` are decoded as JSON."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._idle: list[_Connection] = []
        self._head = (
            f"POST {{path}} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            "Content-Length: {length}\r\n\r\n"
        )

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.transport.close()

    async def stream(self, path: str, body: bytes) -> StreamResult:
        if self._idle:
            conn = self._idle.pop()
        else:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        head = self._head.format(path=path, length=len(body)).encode()
        done = conn.expect(time.perf_counter())
        conn.transport.write(head + body)
        try:
            result, body, keep = await done
        except BaseException:
            conn.transport.close()
            raise
        if keep and not conn.lost:
            self._idle.append(conn)
        else:
            conn.transport.close()
        if result.status != 200:
            raise HTTPStatusError(f"HTTP {result.status}: {body[:300]!r}")
        _parse_sse(body, result)
        return result


class _Connection(asyncio.Protocol):
    """One keep-alive connection of `LeanClient`: the response to the request last sent,
    parsed as its bytes arrive (head, then a chunked, sized or close-delimited body)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._done: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def expect(self, t0: float) -> asyncio.Future:
        """The next response: a future of (StreamResult, body bytes, keep-alive)."""
        if self.lost:
            raise ConnectionError("the connection is closed")
        self._t0 = t0
        self._head = b""
        self._result: StreamResult | None = None
        self._dechunk: _ChunkedBody | None = None
        self._length = -1  # a Content-Length body's size; -1: chunked or until close
        self._parts: list[bytes] = []
        self._recent = b""
        self._keep = False
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    def data_received(self, data: bytes) -> None:
        done = self._done
        if done is None or done.done():
            self._fail(ValueError(f"bytes outside a response: {data[:64]!r}"))
            return
        try:
            self._feed(data)
        except Exception as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        done = self._done
        if done is None or done.done():
            return
        if self._result is not None and self._dechunk is None and self._length < 0:
            self._finish()  # a body that ends with the connection
        else:
            self._fail(ConnectionError(f"the connection closed inside a response ({exc})"))

    def _fail(self, exc: Exception) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        self.transport.close()

    def _feed(self, data: bytes) -> None:
        if self._result is None:
            data = self._read_head(data)
            if self._result is None:
                return  # the head is not whole yet
            if not data and self._length != 0:
                return  # nothing of the body yet (an empty sized body is complete now)
        if self._dechunk is not None:
            body = self._dechunk.feed(data)
            if body:
                self._body(body)
            if self._dechunk.finished:
                if self._dechunk.buf:
                    raise ValueError(f"bytes after the chunked body: {self._dechunk.buf[:64]!r}")
                self._finish()
        elif self._length >= 0:
            self._parts.append(data)
            self._length -= len(data)
            if self._length < 0:
                raise ValueError("bytes after a Content-Length body")
            if self._length == 0:
                self._finish()
        else:
            self._parts.append(data)

    def _read_head(self, data: bytes) -> bytes:
        """Collect the head; parse it once whole. Returns the bytes after it."""
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self._head = head
            return b""
        lines = head[:end].decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        result = StreamResult()
        result.status = int(status)
        self._keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            self._dechunk = _ChunkedBody()
        elif "content-length" in headers:
            self._length = int(headers["content-length"])
        else:
            self._keep = False
        self._result = result
        return head[end + 4 :]

    def _body(self, body: bytes) -> None:
        if self._recent is not None:  # `"text"` may be cut between two reads
            recent = self._recent[-5:] + body
            if b'"text"' in recent:
                self._result.first_token_s = time.perf_counter() - self._t0
                self._recent = None
            else:
                self._recent = recent
        self._parts.append(body)

    def _finish(self) -> None:
        self._done.set_result((self._result, b"".join(self._parts), self._keep))


def _parse_sse(body: bytes, result: StreamResult) -> None:
    """Count the events of a complete SSE body and decode the few the checks need."""
    events = body.split(b"\n\n")
    if events[-1]:
        raise ValueError(f"the stream does not end with an empty line: {events[-1][-100:]!r}")
    events.pop()
    for event in events:
        if not event.startswith(b"data: "):
            raise ValueError(f"not a data event: {event[:100]!r}")
        if event == b"data: [DONE]":
            result.done = True
            continue
        if result.done:
            raise ValueError("an event after [DONE]")
        if b'"text"' in event:
            result.text_events += 1
        if b'"usage":{' in event or b'"finish_reason":"' in event or b'"error"' in event:
            payload = json.loads(event[6:])
            if "error" in payload:
                raise RuntimeError(f"error event in the stream: {payload['error']}")
            for choice in payload.get("choices", ()):
                if choice.get("finish_reason"):
                    result.finish_reasons.append(choice["finish_reason"])
            if payload.get("usage"):
                result.usage = payload["usage"]


def run_client(main):
    """`asyncio.run(main)` on uvloop's event loop when it is installed (the stack's gateway
    runs on it too): the client's loop costs less of the CPU it shares with the stack."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def request_body(model: str, prompt: list[int], tokens: int) -> dict:
    """The benchmark's request: greedy, exactly `tokens` tokens streamed, usage at the end."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# ---------------------------------------------------------------- (a) the full stack
class Stack:
    def __init__(
        self, path: pathlib.Path, kv_bytes: str, extra: list[str], client_kind: str = "lean"
    ) -> None:
        self.client_kind = client_kind
        """"lean" (LeanClient) or "httpx" (async httpx, the client this script used before)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(path)
        cmd = [sys.executable, "-m", "splitserve.entrypoints.cli", "serve", str(path)]
        cmd += ["--port", str(self.port), "--kv-cache-memory", kv_bytes]
        cmd += ["--log-level", "warning", "--disable-uvicorn-access-log", *extra]
        self.proc = subprocess.Popen(cmd)
        self.cpu: dict[str, float] = {}
        """CPU seconds per process (the services by name, and "client") in run()s so far."""

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the stack did not start")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def body(self, prompt: list[int], tokens: int) -> dict:
        return request_body(self.model, prompt, tokens)

    async def _one(self, client, prompt: list[int], tokens: int) -> tuple[int, float]:
        """(completion tokens from the usage chunk, seconds to the first token's chunk)."""
        if self.client_kind == "httpx":
            return await self._one_httpx(client, prompt, tokens)
        res = await client.stream("/v1/completions", json.dumps(self.body(prompt, tokens)).encode())
        if not res.done or res.usage is None:
            raise RuntimeError(f"a stream without [DONE] or usage (done {res.done})")
        if res.finish_reasons != ["length"] or not 0 < res.text_events <= tokens:
            raise RuntimeError(
                f"finish reasons {res.finish_reasons}, {res.text_events} text events "
                f"for {tokens} tokens"
            )
        return res.usage["completion_tokens"], res.first_token_s

    async def _one_httpx(self, client, prompt: list[int], tokens: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        first = None
        tail = b""
        async with client.stream("POST", "/v1/completions", json=self.body(prompt, tokens)) as r:
            r.raise_for_status()
            async for chunk in r.aiter_raw():
                if first is None and b'"text"' in chunk:
                    first = time.perf_counter() - t0
                tail = (tail + chunk)[-4096:]
        usage = None
        for line in tail.split(b"\n"):
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
        if not usage:
            raise RuntimeError(f"no usage chunk in the stream's tail: {tail[-300:]!r}")
        return usage["completion_tokens"], first if first is not None else float("nan")

    @contextlib.asynccontextmanager
    async def _client(self, connections: int):
        if self.client_kind == "httpx":
            import httpx

            limits = httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections
            )
            async with httpx.AsyncClient(base_url=self.url, timeout=3600, limits=limits) as c:
                yield c
            return
        client = LeanClient("127.0.0.1", self.port)
        try:
            yield client
        finally:
            await client.close()

    def _cpu_now(self) -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")
        out = {"client": _cpu_seconds(os.getpid(), tick)}
        for pid in _children(self.proc.pid):
            argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            name = next((a.decode() for a in argv if a.decode() in _SERVICES), str(pid))
            out[name] = _cpu_seconds(pid, tick)
        return out

    def measure(self, prompts: list[list[int]], tokens: int) -> float:
        """run() with the CPU time of every process added to `cpu`."""
        before = self._cpu_now() if sys.platform == "linux" else {}
        rate = run_client(self.run(prompts, tokens))
        if before:
            for name, secs in self._cpu_now().items():
                self.cpu[name] = self.cpu.get(name, 0.0) + secs - before.get(name, secs)
        return rate

    async def run(self, prompts: list[list[int]], tokens: int) -> float:
        # NOTE: the client lives for one round, so each round opens its connections anew
        # (as the httpx client did); within the round each request has its own.
        async with self._client(len(prompts)) as c:
            t0 = time.perf_counter()
            res = await asyncio.gather(*(self._one(c, p, tokens) for p in prompts))
            secs = time.perf_counter() - t0
        bad = [n for n, _ in res if n != tokens]
        if bad:
            raise AssertionError(f"{len(bad)} stack responses without {tokens} tokens: {bad[:5]}")
        return len(prompts) * tokens / secs

    async def ttft(self, prompt: list[int], samples: int) -> float:
        async with self._client(1) as c:
            times = [(await self._one(c, prompt, 1))[1] for _ in range(samples)]
        return statistics.median(times)


_SERVICES = ("gateway", "scheduler", "worker", "tokenizer")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cpu_seconds(pid: int, tick: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick  # utime + stime


# ---------------------------------------------------------------- (b) in-process engine
class Engine:
    def __init__(self, path: pathlib.Path, kv_bytes: str) -> None:
        from splitserve import LLM
        from splitserve.entrypoints.config_cli import _parse_int

        self.llm = LLM(str(path), kv_cache_memory=_parse_int(kv_bytes))
        self.cpu = 0.0
        """CPU seconds this process (all its threads) spent in run()s so far."""

    def run(self, prompts: list[list[int]], tokens: int) -> float:
        from splitserve import SamplingParams

        sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, detokenize=True)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        res = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        secs = time.perf_counter() - t0
        self.cpu += time.process_time() - cpu0
        bad = [len(r.outputs[0].token_ids) for r in res if len(r.outputs[0].token_ids) != tokens]
        if bad:
            raise AssertionError(f"{len(bad)} engine outputs without {tokens} tokens: {bad[:5]}")
        return len(prompts) * tokens / secs

    def ttft(self, prompt: list[int], samples: int) -> float:
        from splitserve import SamplingParams

        sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            self.llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=256, help="concurrent streaming requests")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each, alternating")
    ap.add_argument("--ttft-samples", type=int, default=20)
    ap.add_argument("--kv-cache-memory", default="512MiB")
    ap.add_argument(
        "--client",
        choices=("lean", "httpx"),
        default="lean",
        help="the benchmark's HTTP client: raw asyncio streams (lean) or async httpx",
    )
    ap.add_argument(
        "--serve-arg", action="append", default=[], help="extra `splitserve serve` flag"
    )
    args = ap.parse_args()
    path = model_folder()
    prompts = prompts_for(args.streams, args.prompt_len, TINY_MODEL["vocab_size"])
    print(
        f"model {path}; {args.streams} streams x {args.tokens} tokens, prompts of "
        f"{args.prompt_len} tokens; {os.cpu_count()} CPUs; {args.rounds} rounds each",
        flush=True,
    )
    stack = Stack(path, args.kv_cache_memory, args.serve_arg, args.client)
    try:
        engine = Engine(path, args.kv_cache_memory)
        stack.wait_ready()
        # Warm-up: both paths once at full concurrency (imports, caches, allocator).
        run_client(stack.run(prompts, 8))
        engine.run(prompts, 8)
        a, b = [], []
        for k in range(args.rounds):
            a.append(stack.measure(prompts, args.tokens))
            b.append(engine.run(prompts, args.tokens))
            print(
                f"round {k}: (a) stack {a[-1]:.0f} tok/s  (b) engine {b[-1]:.0f} tok/s "
                f"ratio {a[-1] / b[-1]:.3f}",
                flush=True,
            )
        ttft_a = run_client(stack.ttft(prompts[0], args.ttft_samples))
        ttft_b = engine.ttft(prompts[0], args.ttft_samples)
    finally:
        stack.stop()
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"(a) full stack over HTTP : {ma:.0f} tok/s (median of {args.rounds})")
    print(f"(b) in-process engine    : {mb:.0f} tok/s (median of {args.rounds})")
    print(f"a/b = {ma / mb:.3f}  (target >= 0.8)")
    if stack.cpu:
        secs = sum(args.streams * args.tokens / x for x in a)  # wall time of the stack rounds
        total = sum(stack.cpu.values())
        parts = ", ".join(f"{k} {v / args.rounds:.1f}" for k, v in sorted(stack.cpu.items()))
        print(
            f"CPU seconds per stack round: {parts}; all {total / args.rounds:.1f} "
            f"in {secs / args.rounds:.1f} s of wall time"
        )
        # NOTE: CPU seconds depend far less than tok/s on what else runs on the machine:
        # under load this ratio is the steadier measure of what the split costs.
        served = total - stack.cpu.get("client", 0.0)
        print(
            f"CPU seconds per round: in-process engine {engine.cpu / args.rounds:.1f}, stack "
            f"without the client {served / args.rounds:.1f}; engine/stack "
            f"{engine.cpu / served:.3f}"
        )
    print(
        f"TTFT at concurrency 1: stack {ttft_a * 1e3:.1f} ms, in-process {ttft_b * 1e3:.1f} ms, "
        f"difference {(ttft_a - ttft_b) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
