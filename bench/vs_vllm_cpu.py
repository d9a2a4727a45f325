"""splitserve against vLLM's CPU build on the same ~220M Llama-shaped fp32 model, alternating.

    python bench/vs_vllm_cpu.py --vllm-venv /work/vllm-venv            # 2 rounds, c = 1, 8, 32
    python bench/vs_vllm_cpu.py --vllm-venv /work/vllm-venv --rounds 1 --concurrency 1,8
    python bench/vs_vllm_cpu.py --only splitserve                      # splitserve alone

The model (built once into the cache): hidden 1024, 12 layers, 16 heads, MLP 2816, vocab
32000, random fp32 weights, and a tokenizer that covers the whole embedding (a trained BPE
padded with plain added tokens), so every sampled id decodes to text.

Each round starts `splitserve serve` and then `vllm serve` (from --vllm-venv) on that folder, one
at a time, and runs the same load against each: for each concurrency C, C clients send
streaming `/v1/completions` requests back to back (prompt: 128 random token ids, 64 output
tokens, `ignore_eos`, greedy) until `--requests-per-client` x C requests are done. Printed per
server and concurrency: output tokens/s (all completion tokens over the wall time), mean
inter-token latency ((last chunk - first chunk) / (tokens - 1), per request), mean time to
first token; then splitserve / vLLM ratios per round and their geometric mean.

This is a small load generator of our own with the guidellm workload's shape (bench/vs_vllm_cpu.md
says why and how to run guidellm itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import random
import signal
import statistics
import subprocess
import sys
import time

from splitserve.entrypoints.launcher import free_port

MODEL = dict(hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16, vocab=32000)
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 64


def model_folder(vocab: int = MODEL["vocab"]) -> pathlib.Path:
    """The benchmark model; built once (a minute or two) under the splitserve cache."""
    cache = pathlib.Path(
        os.environ.get("SPLITSERVE_CACHE", pathlib.Path.home() / ".cache" / "splitserve")
    )
    path = cache / "vs-vllm-220m-v1"
    if (path / "model.safetensors").exists():
        return path
    import torch
    import transformers

    from splitserve.testing.demo_model import build_tokenizer

    tmp = cache / f".vs-vllm-build-{os.getpid()}"
    build_tokenizer(tmp, vocab_size=vocab)
    tok = transformers.AutoTokenizer.from_pretrained(tmp)
    # NOTE: the corpus may not yield `vocab` merges; plain added tokens fill the rest so that
    # every embedding row decodes to text (an id that decodes to nothing streams no chunk).
    if len(tok) < vocab:
        tok.add_tokens([f"<w{i}>" for i in range(vocab - len(tok))])
        tok.save_pretrained(tmp)
    assert len(tok) == vocab, len(tok)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=MODEL["hidden_size"],
        intermediate_size=MODEL["intermediate_size"],
        num_hidden_layers=MODEL["num_layers"],
        num_attention_heads=MODEL["num_heads"],
        num_key_value_heads=MODEL["num_heads"],
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().eval().save_pretrained(tmp)
    tmp.rename(path)
    return path


# ---------------------------------------------------------------- servers
def splitserve_cmd(path: pathlib.Path, port: int, exe: str, extra: list[str]):
    cmd = [exe, "serve", str(path), "--port", str(port), "--max-model-len", "1024"]
    cmd += ["--kv-cache-memory", "1GiB", "--log-level", "warning", *extra]
    return cmd, {}


def vllm_cmd(path: pathlib.Path, port: int, venv: pathlib.Path, extra: list[str]):
    cmd = [str(venv / "bin" / "vllm"), "serve", str(path), "--port", str(port)]
    cmd += ["--dtype", "float32", "--max-model-len", "1024", *extra]
    # VLLM_CPU_KVCACHE_SPACE is in GiB; the other CPU settings keep vLLM's defaults.
    return cmd, {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


class Server:
    """One server process, started on entry and stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, name: str, cmd: list[str], env: dict, port: int, log: pathlib.Path):
        self.name, self.cmd, self.port, self.log = name, cmd, port, log
        self.env = {**os.environ, **env}
        self.url = f"http://127.0.0.1:{port}"
        self.startup_s = 0.0

    def __enter__(self) -> Server:
        import httpx

        t0 = time.monotonic()
        self.out = self.log.open("w")
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = t0 + 600
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"{self.name} did not start; see {self.log}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        self.model = httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.out.close()


# ---------------------------------------------------------------- load
async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    chunks: list[float] = []
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else 0
    if tokens != max_tokens or not chunks:
        raise RuntimeError(f"asked for {max_tokens} tokens, got {tokens} ({len(chunks)} chunks)")
    itl = (chunks[-1] - chunks[0]) / (tokens - 1) if tokens > 1 else 0.0
    return {"tokens": tokens, "ttft": chunks[0] - start, "itl": itl}


async def run_load(url: str, model: str, concurrency: int, requests: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    prompts = [
        [rng.randrange(10, MODEL["vocab"]) for _ in range(PROMPT_TOKENS)] for _ in range(requests)
    ]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        queue = list(prompts)
        results: list[dict] = []

        async def worker():
            while queue:
                results.append(await _one(client, url, model, queue.pop(), OUTPUT_TOKENS))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "itl_ms": 1e3 * statistics.mean(r["itl"] for r in results),
        "ttft_ms": 1e3 * statistics.mean(r["ttft"] for r in results),
    }


def sweep(server: Server, concurrencies: list[int], per_client: int, seed: int) -> dict:
    asyncio.run(run_load(server.url, server.model, 2, 2, seed + 999))  # warm-up
    out = {}
    for c in concurrencies:
        out[c] = asyncio.run(
            run_load(server.url, server.model, c, max(4, per_client * c), seed + c)
        )
        r = out[c]
        print(
            f"  {server.name:10s} c={c:<3d} {r['tok_s']:8.1f} tok/s  ITL {r['itl_ms']:7.1f} ms"
            f"  TTFT {r['ttft_ms']:8.1f} ms",
            flush=True,
        )
    return out


def _load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} on {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-venv", default=os.environ.get("VLLM_VENV", "/work/vllm-venv"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--skip-vllm", action="store_true", help="splitserve and baseline only")
    ap.add_argument("--only", choices=("splitserve", "baseline", "vllm"), default=None)
    ap.add_argument(
        "--splitserve-exe",
        default=str(pathlib.Path(sys.executable).with_name("splitserve")),
        help="the `splitserve` executable to measure (default: the one beside this python)",
    )
    ap.add_argument(
        "--baseline-exe",
        default=None,
        help="a second `splitserve` executable (another checkout's install, e.g. main's) run "
        "as 'baseline' in each round, between splitserve and vLLM",
    )
    ap.add_argument("--splitserve-args", default="", help="extra flags for splitserve serve")
    ap.add_argument("--baseline-args", default=None, help="its flags (default: as splitserve's)")
    ap.add_argument("--vllm-args", default="", help="extra flags for vllm serve")
    ap.add_argument("--logs", default="/tmp/vs_vllm_cpu", help="folder for the servers' logs")
    args = ap.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    path = model_folder()
    logs = pathlib.Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    venv = pathlib.Path(args.vllm_venv)
    names = ["splitserve", *(["baseline"] if args.baseline_exe else []), "vllm"]
    names = [args.only] if args.only else names
    if args.skip_vllm:
        names.remove("vllm")
    print(f"model {path}; {_load_line()}", flush=True)
    table: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        # NOTE: every other round runs the servers in reverse order, so that neither always
        # goes first (right after the previous server exited, or while it still drains).
        for name in names if rnd % 2 == 0 else names[::-1]:
            port = free_port()
            if name in ("splitserve", "baseline"):
                exe, extra = args.splitserve_exe, args.splitserve_args
                if name == "baseline":
                    exe = args.baseline_exe
                    extra = extra if args.baseline_args is None else args.baseline_args
                cmd, env = splitserve_cmd(path, port, exe, extra.split())
            else:
                cmd, env = vllm_cmd(path, port, venv, args.vllm_args.split())
            with Server(name, cmd, env, port, logs / f"{name}-{rnd}.log") as server:
                print(f"round {rnd} {name}: started in {server.startup_s:.0f} s; {_load_line()}")
                table[name].append(sweep(server, concurrencies, args.requests_per_client, rnd))
    for a, b in (("splitserve", "vllm"), ("baseline", "vllm"), ("splitserve", "baseline")):
        if a in table and b in table:
            print_ratios(table, a, b, concurrencies)


def print_ratios(table: dict, a: str, b: str, concurrencies: list[int]) -> None:
    def gm(xs: list[float]) -> float:
        return math.exp(statistics.mean(map(math.log, xs)))

    print(f"\n{a} / {b} (per round -> geometric mean):")
    for c in concurrencies:
        tok = [x[c]["tok_s"] / y[c]["tok_s"] for x, y in zip(table[a], table[b])]
        itl = [x[c]["itl_ms"] / y[c]["itl_ms"] for x, y in zip(table[a], table[b])]
        print(
            f"  c={c:<3d} tok/s {' '.join(f'{x:.2f}' for x in tok)} -> {gm(tok):.2f}   "
            f"ITL {' '.join(f'{x:.2f}' for x in itl)} -> {gm(itl):.2f}"
        )


if __name__ == "__main__":
    main()
