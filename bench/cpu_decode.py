"""CPU decode throughput of the in-process engine: two CPU paths A/B in one process.

    python bench/cpu_decode.py                      # ~220M-param Llama, fp32, batch 1 / 8 / 32
    python bench/cpu_decode.py --variants gather,plain  # the older decode attention vs in place
    python bench/cpu_decode.py --small --rounds 1   # a quick run on a tiny model
    python bench/cpu_decode.py --profile 32         # where a decode step's time goes, batch 32

Two engines (`splitserve.LLM`) over the same weights are built in one process, each with the
environment switches of its variant (`VARIANTS`; default `plain` vs `packed`: torch's GEMM on
plain weights against oneDNN on packed ones). Each round runs every concurrency on both
engines, alternating, so that other load on the machine hits both alike; the ratio b/a is
printed per round.

Workload per measurement: `batch` random prompts of 128 tokens, 64 output tokens each
(greedy, `ignore_eos`), all submitted at once. Output tokens/s counts every generated token
over the wall time of the whole call (prefill included).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import time

VARIANTS = {
    "gather": {"SPLITSERVE_CPU_PAGED_DECODE": "0", "SPLITSERVE_CPU_ONEDNN_LINEAR": "0"},
    "plain": {"SPLITSERVE_CPU_PAGED_DECODE": "1", "SPLITSERVE_CPU_ONEDNN_LINEAR": "0"},
    "packed": {"SPLITSERVE_CPU_PAGED_DECODE": "1", "SPLITSERVE_CPU_ONEDNN_LINEAR": "1"},
    "onednn": {"SPLITSERVE_CPU_PAGED_DECODE": "1", "SPLITSERVE_CPU_ONEDNN_LINEAR": "plain"},
}
"""Engine variants by the environment switches they are built with: `gather` copies each
row's KV blocks into a dense buffer per layer (the older decode attention); `plain` reads the
paged cache in place with torch's GEMM for linears; `packed` adds oneDNN-packed weights;
`onednn` runs oneDNN on the plain weights from two rows (torch's GEMV for one)."""


def _serve_throughput():
    """bench/serve_throughput.py, for its model (loaded by path: putting bench/ on sys.path
    would let bench/kernels.py shadow the `kernels` package transformers imports)."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "_serve_throughput", pathlib.Path(__file__).with_name("serve_throughput.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_engine(path, env: dict[str, str]):
    """An LLM built with `env` set (the switches are read while the engine is built)."""
    from splitserve import LLM

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return LLM(str(path), kv_cache_memory=512 << 20, max_num_seqs=64, max_model_len=1024)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prompts_for(batch: int, vocab: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(batch)]


def tokens_per_s(llm, prompts, output_len: int) -> float:
    from splitserve import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    count = sum(len(o.outputs[0].token_ids) for o in outs)
    assert count == len(prompts) * output_len, count
    return count / elapsed


def profile(llm, prompts, output_len: int, steps: int = 20) -> None:
    """torch.profiler over `steps` decode steps (after 5 warm ones) of the engine's worker."""
    import torch

    from splitserve import SamplingParams

    runner = llm.engine.executor.runner
    execute, state = runner.execute, {"n": 0, "prof": None, "wall": 0.0}

    def timed(step, *args, **kwargs):
        decode = set(step.num_scheduled_tokens.values()) == {1}
        n = state["n"]
        if decode and n == 5:
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["prof"].start()
        start = time.perf_counter()
        result = execute(step, *args, **kwargs)
        if decode:
            if 5 <= n < 5 + steps:
                state["wall"] += time.perf_counter() - start
            state["n"] = n + 1
            if n + 1 == 5 + steps:
                state["prof"].stop()
        return result

    runner.execute = timed
    try:
        llm.generate(
            prompts, SamplingParams(max_tokens=output_len, ignore_eos=True), use_tqdm=False
        )
    finally:
        runner.execute = execute
    prof = state["prof"]
    if prof is None:
        print("too few decode steps to profile")
        return
    totals: dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total
    wall_ms = state["wall"] * 1e3 / steps
    print(f"decode step: {wall_ms:.1f} ms wall (mean of {steps}); self CPU time by op per step:")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {name:48s} {us / 1e3 / steps:8.2f} ms  {us / 1e3 / steps / wall_ms:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model (a quick check)")
    parser.add_argument("--batches", default="1,8,32", help="concurrencies, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--variants", default="plain,packed", help=f"a,b of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", type=int, metavar="BATCH", help="profile both paths")
    args = parser.parse_args()

    import torch

    a, b = args.variants.split(",")
    path = _serve_throughput().model_folder(args.small)
    vocab = 1000 if args.small else 2000
    engines = {name: build_engine(path, VARIANTS[name]) for name in (a, b)}
    print(f"model {path}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    for llm in engines.values():  # warm-up: first calls pay one-off costs
        llm.generate(prompts_for(2, vocab, 16, 0), use_tqdm=False)
    if args.profile:
        prompts = prompts_for(args.profile, vocab, args.prompt_len, 1)
        for name, llm in engines.items():
            print(f"== {name}, batch {args.profile}")
            profile(llm, prompts, args.output_len)
        return
    batches = [int(n) for n in args.batches.split(",")]
    results: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    for r in range(args.rounds):
        for batch in batches:
            prompts = prompts_for(batch, vocab, args.prompt_len, seed=100 * r + batch)
            for name in (a, b) if r % 2 == 0 else (b, a):
                results[name, batch].append(tokens_per_s(engines[name], prompts, args.output_len))
            x, y = results[a, batch][-1], results[b, batch][-1]
            print(f"round {r} batch {batch:3d}: {a} {x:7.1f} tok/s  {b} {y:7.1f} tok/s  "
                  f"{b}/{a} {y / x:5.2f}", flush=True)  # fmt: skip
    print(f"\n| batch | {a} tok/s | {b} tok/s | {b}/{a} per round | median ratio |")
    print("|---|---|---|---|---|")
    for batch in batches:
        xs, ys = results[a, batch], results[b, batch]
        ratios = [y / x for x, y in zip(xs, ys, strict=True)]
        print(f"| {batch} | {' / '.join(f'{x:.1f}' for x in xs)} | "
              f"{' / '.join(f'{y:.1f}' for y in ys)} | "
              f"{' / '.join(f'{q:.2f}' for q in ratios)} | {statistics.median(ratios):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
