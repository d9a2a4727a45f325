"""What the process split costs per token: the full stack over HTTP vs the in-process engine.

    python bench/stack_overhead.py                   # 256 streams x 128 tokens, 3 rounds
    python bench/stack_overhead.py --rounds 1 --streams 64

A tiny model (2 layers, hidden 64) keeps the model's compute negligible, so what is left is
the per-token cost of everything around it. (a) `splitserve serve` as a subprocess, driven
by `--streams` concurrent streaming /v1/completions requests (async httpx, `ignore_eos`,
`--tokens` each, prompts given as token ids); (b) `splitserve.LLM` in this process on the
same prompts. The two alternate, `--rounds` times each, after a warm-up of both; every
response must report exactly `--tokens` completion tokens (the stack's from its usage chunk,
the engine's from its token ids). Then time-to-first-token at concurrency 1 (median of
`--ttft-samples` streamed 1-token requests; the engine's is one `generate` of 1 token).
Prints tok/s of each round, the medians, their ratio a/b and the TTFT difference, and the CPU
seconds each process of the stack (and this client) spent in the stack rounds (Linux /proc).

The client is kept light (raw SSE bytes, the usage chunk parsed once) because it shares the
machine's cores with the stack.
"""

from __future__ import annotations

import argparse
import asyncio
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


# ---------------------------------------------------------------- (a) the full stack
class Stack:
    def __init__(self, path: pathlib.Path, kv_bytes: str, extra: list[str]) -> None:
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
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def _one(self, client, prompt: list[int], tokens: int) -> tuple[int, float]:
        """(completion tokens from the usage chunk, seconds to the first token's chunk)."""
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
        rate = asyncio.run(self.run(prompts, tokens))
        if before:
            for name, secs in self._cpu_now().items():
                self.cpu[name] = self.cpu.get(name, 0.0) + secs - before.get(name, secs)
        return rate

    async def run(self, prompts: list[list[int]], tokens: int) -> float:
        import httpx

        limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
        async with httpx.AsyncClient(base_url=self.url, timeout=3600, limits=limits) as c:
            t0 = time.perf_counter()
            res = await asyncio.gather(*(self._one(c, p, tokens) for p in prompts))
            secs = time.perf_counter() - t0
        bad = [n for n, _ in res if n != tokens]
        if bad:
            raise AssertionError(f"{len(bad)} stack responses without {tokens} tokens: {bad[:5]}")
        return len(prompts) * tokens / secs

    async def ttft(self, prompt: list[int], samples: int) -> float:
        import httpx

        async with httpx.AsyncClient(base_url=self.url, timeout=600) as c:
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

    def run(self, prompts: list[list[int]], tokens: int) -> float:
        from splitserve import SamplingParams

        sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, detokenize=True)
        t0 = time.perf_counter()
        res = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        secs = time.perf_counter() - t0
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
    stack = Stack(path, args.kv_cache_memory, args.serve_arg)
    try:
        engine = Engine(path, args.kv_cache_memory)
        stack.wait_ready()
        # Warm-up: both paths once at full concurrency (imports, caches, allocator).
        asyncio.run(stack.run(prompts, 8))
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
        ttft_a = asyncio.run(stack.ttft(prompts[0], args.ttft_samples))
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
    print(
        f"TTFT at concurrency 1: stack {ttft_a * 1e3:.1f} ms, in-process {ttft_b * 1e3:.1f} ms, "
        f"difference {(ttft_a - ttft_b) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
