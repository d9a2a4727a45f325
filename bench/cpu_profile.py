"""Where a CPU step's time goes: torch.profiler over the in-process engine, per op.

    python bench/cpu_profile.py prefill:8,decode:1,decode:8,decode:32          # per-op totals
    python bench/cpu_profile.py prefill:8,decode:8 shapes                     # + by input shape

`prefill:N` profiles the one step that prefills N prompts of 128 random tokens; `decode:N`
ten decode steps at batch N (after three warm ones). Greedy, `ignore_eos`. The model is the
~220M folder `bench/vs_vllm_cpu.py` builds (run that once first). Prints wall time per step,
the load average, and self CPU time per op; the difference between the wall time and the ops'
sum is Python and scheduling. Figures: bench/RESULTS.md (2026-12-06 17:00).
"""

from __future__ import annotations

import collections
import os
import random
import sys
import time

import torch

from splitserve import LLM, SamplingParams

cache = os.environ.get("SPLITSERVE_CACHE", os.path.expanduser("~/.cache/splitserve"))
path = os.path.join(cache, "vs-vllm-220m-v1")
llm = LLM(path, kv_cache_memory=512 << 20, max_num_seqs=64, max_model_len=1024)
runner = llm.engine.executor.runner
execute = runner.execute


def prompts(b, n=128, seed=0):
    r = random.Random(seed)
    return [[r.randrange(10, 30000) for _ in range(n)] for _ in range(b)]


# NOTE: the first profiler session of a process records nothing here (kineto's init): spend it.
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
    torch.ones(3).sum()
llm.generate(prompts(2, 16), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)


def run(batch, kind, steps=10):
    steps = 1 if kind == "prefill" else steps
    state = {"n": 0, "prof": None, "wall": 0.0, "cnt": 0}

    def timed(step, *a, **k):
        decode = set(step.num_scheduled_tokens.values()) == {1}
        want = decode if kind == "decode" else not decode
        n = state["n"]
        if want and n == (3 if kind == "decode" else 0) and state["prof"] is None:
            state["prof"] = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=len(sys.argv) > 2
            )
            state["prof"].start()
        t = time.perf_counter()
        res = execute(step, *a, **k)
        if want:
            if state["prof"] is not None and state["cnt"] < steps:
                state["wall"] += time.perf_counter() - t
                state["cnt"] += 1
                if state["cnt"] == steps:
                    state["prof"].stop()
            state["n"] = n + 1
        return res

    runner.execute = timed
    try:
        llm.generate(
            prompts(batch, seed=batch),
            SamplingParams(
                max_tokens=(2 if kind == "prefill" else 20), ignore_eos=True, temperature=0
            ),
            use_tqdm=False,
        )
    finally:
        runner.execute = execute
    prof, cnt = state["prof"], state["cnt"]
    if prof is None or not cnt:
        print("nothing profiled")
        return
    totals = collections.Counter()
    for ev in prof.key_averages():
        totals[ev.key] += ev.self_cpu_time_total
    wall = state["wall"] * 1e3 / cnt
    tot = sum(totals.values()) / 1e3 / cnt
    print(
        f"== {kind} batch {batch}: {wall:.1f} ms wall/step ({cnt} steps), op self CPU sum {tot:.1f} ms, load {os.getloadavg()[0]:.2f}"
    )
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:18]:
        print(f"  {name:50s} {us / 1e3 / cnt:8.2f} ms {us / 1e3 / cnt / wall:6.1%}")
    if len(sys.argv) > 2:
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total",
                row_limit=30,
                max_name_column_width=30,
                max_shapes_column_width=80,
            )
        )


for spec in sys.argv[1].split(","):
    kind, b = spec.split(":")
    run(int(b), kind)
