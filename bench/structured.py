"""Structured outputs: what the grammar costs, per backend (xgrammar, guidance).

    python bench/structured.py            # 32 requests, 96 output tokens, a ~30M-param Llama
    python bench/structured.py --small    # a quick run on a tiny model

For each backend, in one run of the in-process engine (`splitserve.LLM`, same scheduler and
worker code as the server):
- throughput (output tokens/s) of 32 concurrent JSON-schema requests against the same 32
  requests unconstrained (ignore_eos), and the ratio;
- the per-step mask time (filling the bitmask rows of every constrained request of a step,
  done on a helper thread while the forward pass runs), p50 / p99, and how long the sampler
  waited for it;
- compile time p50 / p99 over the 199 schemas of shared/testdata/jsonschemabench (the ones the
  backend takes; the refused count is printed).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "active"],
    "additionalProperties": False,
}
MODEL = dict(
    vocab_size=8000, hidden_size=512, intermediate_size=1376, num_layers=6, num_heads=8,
    num_kv_heads=8,
)  # fmt: skip
SMALL_MODEL = dict(
    vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
    num_kv_heads=2,
)  # fmt: skip
BENCH_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared/testdata/jsonschemabench"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def timed_masks(llm) -> tuple[list[float], list[float]]:
    """Record each step's mask fill time and the sampler's wait for it."""
    runner = llm.engine.executor.runner
    structured = runner.structured
    fills: list[float] = []
    waits: list[float] = []
    fill = structured.fill

    def timed_fill(rids, positions):
        start = time.perf_counter()
        try:
            return fill(rids, positions)
        finally:
            fills.append(time.perf_counter() - start)

    structured.fill = timed_fill
    start_masks = runner._start_masks

    def timed_start(plan):
        masks = start_masks(plan)
        if masks is not None and masks.future is not None:
            future = masks.future
            result = future.result

            def waited(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return result(*args, **kwargs)
                finally:
                    waits.append(time.perf_counter() - t)

            future.result = waited
        return masks

    runner._start_masks = timed_start
    return fills, waits


def throughput(llm, prompts, params) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / seconds, tokens


def compile_times(llm, backend: str) -> tuple[list[float], int]:
    from splitserve.protos import common_pb2
    from splitserve.tokenizer_svc.grammar import GrammarError
    from splitserve.tokenizer_svc.server import make_grammar_compiler

    config = llm._tokenizer_config
    compiler = make_grammar_compiler(config, llm.tokenizer)
    compiler.cache_size = 0
    times, refused = [], 0
    for path in sorted(BENCH_DATA.glob("*/*.json")):
        spec = common_pb2.GrammarSpec(kind="json", spec=path.read_text(), backend=backend)
        start = time.perf_counter()
        try:
            compiler.compile_sync(spec)
        except GrammarError:
            refused += 1
            continue
        times.append(time.perf_counter() - start)
    return times, refused


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model, fewer tokens")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--backends", default="xgrammar,guidance")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per backend")
    args = ap.parse_args()

    from splitserve import LLM, SamplingParams, StructuredOutputsParams
    from splitserve.testing.demo_model import build_model

    max_tokens = args.max_tokens or (32 if args.small else 96)
    tmp = tempfile.TemporaryDirectory()
    sizes = SMALL_MODEL if args.small else MODEL
    path = build_model(pathlib.Path(tmp.name) / "m", "llama", **sizes)
    llm = LLM(str(path), kv_cache_memory=256 << 20, max_num_seqs=max(args.requests, 1))
    tok = llm.get_tokenizer()
    prompts = [tok.decode(list(range(10 + i, 40 + i))) for i in range(args.requests)]
    print(f"model {sizes}, {args.requests} requests, max_tokens {max_tokens}")
    plain = [
        SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=True)
        for i in range(args.requests)
    ]
    throughput(llm, prompts[:4], plain[:4])  # warm-up
    fills, waits = timed_masks(llm)
    for backend in args.backends.split(","):
        so = StructuredOutputsParams(json=SCHEMA, backend=backend)
        params = [
            SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, structured_outputs=so)
            for i in range(args.requests)
        ]
        throughput(llm, prompts[:4], params[:4])  # warm-up (and the worker's compile)
        fills.clear()
        waits.clear()
        # NOTE: the baseline runs right before each constrained run, alternating, so that
        # load from other processes hits both alike; the median ratio is reported.
        ratios, rates, bases = [], [], []
        for _ in range(args.repeats):
            base, _ = throughput(llm, prompts, plain)
            rate, tokens = throughput(llm, prompts, params)
            ratios.append(rate / base)
            rates.append(rate)
            bases.append(base)
        times, refused = compile_times(llm, backend) if BENCH_DATA.is_dir() else ([], 0)
        print(
            f"{backend}: {statistics.median(rates):.0f} tok/s ({tokens} tokens) vs "
            f"unconstrained {statistics.median(bases):.0f} tok/s, ratio "
            f"{statistics.median(ratios):.2f} (runs: {', '.join(f'{r:.2f}' for r in ratios)})"
            f"; mask per step p50 {percentile(fills, 0.5) * 1e3:.2f} ms "
            f"p99 {percentile(fills, 0.99) * 1e3:.2f} ms over {len(fills)} steps, sampler "
            f"waited p50 {percentile(waits, 0.5) * 1e3:.2f} ms p99 "
            f"{percentile(waits, 0.99) * 1e3:.2f} ms; compile over {len(times)} schemas "
            f"({refused} refused) p50 {percentile(times, 0.5) * 1e3:.1f} ms p99 "
            f"{percentile(times, 0.99) * 1e3:.1f} ms, mean "
            f"{statistics.fmean(times) * 1e3 if times else float('nan'):.1f} ms"
        )
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
