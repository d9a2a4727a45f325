"""Timing helpers the benchmarks in bench/ share (each benchmark prints ratios of times taken
in the same run).

`median_times` runs a list of calls interleaved and returns each one's median; `decode_step_times`
is the decode step of splitserve's in-process engine against transformers' cached generation on
the same checkpoint and prompt (greedy, batch 1), each as (time for N tokens - time for 1 token)
/ (N - 1), so prefill and start-up cancel out.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def median_times(
    fns: Sequence[Callable[[], object]], reps: int, sync: Callable[[], None] = lambda: None
) -> list[float]:
    """Median seconds of one call of each function (interleaved, after one warm-up call each);
    `sync` waits for the device after each call (torch.cuda.synchronize on a GPU)."""
    for fn in fns:
        fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def decode_step_times(path: str, prompt: list[int], tokens: int, reps: int) -> tuple[float, float]:
    """(splitserve's, transformers') seconds per decode step of the model at `path` (CPU,
    float32), over `tokens` greedy tokens after `prompt`."""
    import torch
    import transformers

    from splitserve import LLM, SamplingParams

    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    hf.generation_config.eos_token_id = None

    def hf_run(n: int) -> Callable[[], object]:
        def run():
            with torch.inference_mode():
                hf.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

        return run

    llm = LLM(str(path), kv_cache_memory=64 << 20, max_model_len=1024)

    def ours(n: int) -> Callable[[], object]:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return lambda: llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)

    try:
        t_hf_n, t_hf_1, t_n, t_1 = median_times(
            [hf_run(tokens), hf_run(1), ours(tokens), ours(1)], reps
        )
    finally:
        llm.shutdown()
    return (t_n - t_1) / (tokens - 1), (t_hf_n - t_hf_1) / (tokens - 1)
