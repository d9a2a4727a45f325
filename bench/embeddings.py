"""Embeddings: prompt tokens/s of the pooling runner against transformers and against
splitserve's own generate runner doing the same prefill.

    python bench/embeddings.py            # 6-layer 512-wide Qwen3, 64 prompts of 32-256 tokens
    python bench/embeddings.py --small    # a quick run on a tiny model

(a) `LLM(runner="pooling").embed` (continuous batching, chunked prefill, last-token pooling)
(b) transformers `AutoModel` on the same weights, right-padded batches of `--hf-batch-size`,
    the last real token's hidden state, L2-normalized (the usual sentence-embedding recipe)
(c) `LLM().generate(max_tokens=1)`: the generate runner's prefill plus lm_head and sampling
Prints tokens/s of each (real prompt tokens only) and the ratios a/b and a/c, alternating
the three in each repetition, median over `--repeats`; prefix caching is off (the repetitions
reuse the prompts). The embeddings of (a) and (b) are
checked to agree before anything is timed.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import tempfile
import time


def build(out: pathlib.Path, small: bool) -> pathlib.Path:
    from splitserve.testing.demo_model import build_model

    shape = (
        dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
        if small
        else dict(
            hidden_size=512, intermediate_size=1376, num_layers=6, num_heads=8, num_kv_heads=4
        )
    )
    return build_model(out, "qwen3", vocab_size=4000, max_position_embeddings=1024, **shape)


def prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 3900) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_embed(model, batch: list[list[int]], batch_size: int):
    import torch

    out = []
    for i in range(0, len(batch), batch_size):
        chunk = batch[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, : len(p)] = torch.tensor(p)
            mask[r, : len(p)] = 1
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(chunk)), mask.sum(1) - 1]
        out.extend(torch.nn.functional.normalize(last, dim=-1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModel

    from splitserve import LLM, SamplingParams

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-embed-"))
    path = build(tmp / "model", args.small)
    batch = prompts(args.requests, 32, 256)
    tokens = sum(map(len, batch))
    # NOTE: no prefix caching: every repetition embeds the same prompts, and cache hits would
    # make the later ones cheaper than a fresh workload.
    kw = dict(kv_cache_memory=256 << 20, max_num_batched_tokens=2048, enable_prefix_caching=False)
    pooling = LLM(str(path), runner="pooling", **kw)
    generate = LLM(str(path), **kw)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()

    ours = pooling.embed(batch, use_tqdm=False)
    theirs = hf_embed(hf, batch, args.hf_batch_size)
    worst = max(
        float(np.abs(np.array(o.outputs.embedding) - t.numpy()).max())
        for o, t in zip(ours, theirs, strict=True)
    )
    assert worst < 1e-4, f"embeddings differ from transformers by {worst}"

    greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    runs = {
        "a pooling runner": lambda: pooling.embed(batch, use_tqdm=False),
        "b transformers": lambda: hf_embed(hf, batch, args.hf_batch_size),
        "c generate runner, max_tokens=1": lambda: generate.generate(batch, greedy, use_tqdm=False),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"{args.requests} prompts, {tokens} tokens; max |a - b| = {worst:.2e}")
    for name, r in rate.items():
        print(f"  {name:34s} {r:10.0f} prompt tokens/s")
    a, b, c = rate.values()
    print(f"  a/b = {a / b:.2f}   a/c = {a / c:.2f}")


if __name__ == "__main__":
    main()
