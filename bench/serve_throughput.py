"""Throughput of (a) the full stack over HTTP, (b) the in-process engine, (c) transformers.

    python bench/serve_throughput.py                 # ~200M-param Llama, float32, 64 requests
    python bench/serve_throughput.py --small         # a quick run on a tiny model

The workload: 64 concurrent requests with prompts of 32-256 tokens and outputs of 16-128
tokens (`ignore_eos`, so each yields exactly its length). (c) runs `transformers.generate`
on the same prompts at its best static batch size (left padding, each batch generating its
longest length; only the requested tokens count). Prints tokens/s for each and the ratios
a/b (cost of the split) and a/c.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

from splitserve.entrypoints.launcher import free_port

BENCH_MODEL = dict(
    vocab_size=2000,
    extra_vocab=30000,
    hidden_size=1024,
    intermediate_size=2816,
    num_layers=12,
    num_heads=16,
    num_kv_heads=16,
)
SMALL_MODEL = dict(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
)


def workload(n: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(32, 256))] for _ in range(n)]
    outs = [rng.randint(16, 128) for _ in range(n)]
    return prompts, outs


def model_folder(small: bool) -> pathlib.Path:
    from splitserve.testing.demo_model import build_model

    cache = pathlib.Path(
        os.environ.get("SPLITSERVE_CACHE", pathlib.Path.home() / ".cache" / "splitserve")
    )
    path = cache / ("bench-small-v1" if small else "bench-200m-v1")
    if not (path / "config.json").exists():
        build_model(
            path, "llama", initializer_range=0.02, **(SMALL_MODEL if small else BENCH_MODEL)
        )
    return path


def count_params(path: pathlib.Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


# ---------------------------------------------------------------- (a) the full stack
async def _send_all(url: str, model: str, prompts, outs) -> tuple[int, float]:
    import httpx

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=256)) as c:

        async def one(p, n):
            r = await c.post(
                url + "/v1/completions",
                json={
                    "model": model,
                    "prompt": p,
                    "max_tokens": n,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, outs)))
        return sum(counts), time.perf_counter() - t0


def bench_stack(path: pathlib.Path, prompts, outs, kv_bytes: str) -> float:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitserve.entrypoints.cli",
            "serve",
            str(path),
            "--port",
            str(port),
            "--kv-cache-memory",
            kv_bytes,
            "--log-level",
            "warning",
        ]
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the stack did not start")
            time.sleep(0.5)
        asyncio.run(_send_all(url, str(path), prompts[:4], [4] * 4))  # warm-up
        tokens, secs = asyncio.run(_send_all(url, str(path), prompts, outs))
        assert tokens == sum(outs), (tokens, sum(outs))
        return tokens / secs
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


# ---------------------------------------------------------------- (b) in-process engine
def bench_engine(path: pathlib.Path, prompts, outs, kv_bytes: str) -> float:
    from splitserve import LLM, SamplingParams
    from splitserve.entrypoints.config_cli import _parse_int

    llm = LLM(str(path), kv_cache_memory=_parse_int(kv_bytes))
    params = [
        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=True) for n in outs
    ]
    llm.generate(prompts[:4], [SamplingParams(max_tokens=4, temperature=0)] * 4)  # warm-up
    t0 = time.perf_counter()
    res = llm.generate(prompts, params)
    secs = time.perf_counter() - t0
    tokens = sum(len(r.outputs[0].token_ids) for r in res)
    assert tokens == sum(outs), (tokens, sum(outs))
    llm.shutdown()
    return tokens / secs


# ---------------------------------------------------------------- (c) transformers
def bench_hf(path: pathlib.Path, prompts, outs, batch_sizes) -> tuple[float, int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    best = (0.0, 0)
    for bs in batch_sizes:
        t0 = time.perf_counter()
        for i in range(0, len(prompts), bs):
            ps, ns = prompts[i : i + bs], outs[i : i + bs]
            width = max(map(len, ps))
            ids = torch.zeros(len(ps), width, dtype=torch.long)
            mask = torch.zeros(len(ps), width, dtype=torch.long)
            for j, p in enumerate(ps):  # left padding
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=max(ns),
                    min_new_tokens=max(ns),
                    pad_token_id=0,
                )
        rate = sum(outs) / (time.perf_counter() - t0)
        print(f"  transformers.generate batch {bs}: {rate:.1f} tok/s", flush=True)
        best = max(best, (rate, bs))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model, quick smoke run")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default="4GiB")
    ap.add_argument("--hf-batch-sizes", default="8,16,32,64")
    ap.add_argument("--skip", default="", help="comma list of a,b,c to skip")
    args = ap.parse_args()
    path = model_folder(args.small)
    import json

    cfg = json.loads((path / "config.json").read_text())
    prompts, outs = workload(args.requests, cfg["vocab_size"])
    print(
        f"model {path} ({count_params(path) / 1e6:.0f}M params, float32); "
        f"{len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, "
        f"{sum(outs)} output tokens; {os.cpu_count()} CPUs",
        flush=True,
    )
    skip = set(args.skip.split(","))
    res = {}
    if "a" not in skip:
        res["a"] = bench_stack(path, prompts, outs, args.kv_cache_memory)
        print(f"(a) full stack over HTTP : {res['a']:.1f} tok/s", flush=True)
    if "b" not in skip:
        res["b"] = bench_engine(path, prompts, outs, args.kv_cache_memory)
        print(f"(b) in-process engine    : {res['b']:.1f} tok/s", flush=True)
    if "c" not in skip:
        sizes = [int(x) for x in args.hf_batch_sizes.split(",")]
        res["c"], bs = bench_hf(path, prompts, outs, sizes)
        print(f"(c) transformers.generate: {res['c']:.1f} tok/s (best batch {bs})", flush=True)
    if "a" in res and "b" in res:
        print(f"a/b = {res['a'] / res['b']:.2f}  (target >= 0.95)")
    if "a" in res and "c" in res:
        print(f"a/c = {res['a'] / res['c']:.2f}  (target >= 1.5)")


if __name__ == "__main__":
    main()
