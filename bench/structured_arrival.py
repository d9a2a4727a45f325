"""What a new grammar's compile on the sampling rank costs the rest of the batch.

    python bench/structured_arrival.py            # ~30M-param Llama, 8000-token vocabulary
    python bench/structured_arrival.py --small    # a quick run on a tiny model

The worker compiles each new xgrammar grammar for its vocabulary (up to ~1 s on the largest
schemas). Unconstrained requests decode; a constrained request with one of the largest
jsonschemabench schemas arrives (a fresh handle each time, so nothing is cached), with a short
prompt (prefilled in one step) or a long one (prefilled in chunks). For each, the worst gap
between two engine steps in the steps after the arrival is compared with the median gap before
it, once as the worker does it (compile on a background thread, the request deferred until its
matcher is ready) and once with the compile forced inside the step the request arrives in
(what the worker did before), alternating, in one run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

from structured import BENCH_DATA, MODEL, SMALL_MODEL


def largest_schemas(llm, count: int) -> list[dict]:
    """The `count` largest schemas that xgrammar takes (the others get a 400)."""
    from splitserve import SamplingParams, StructuredOutputsParams

    files = sorted(BENCH_DATA.glob("*/*.json"), key=lambda p: p.stat().st_size, reverse=True)
    taken = []
    for path in files:
        schema = json.loads(path.read_text())
        so = StructuredOutputsParams(json=schema, backend="xgrammar")
        try:
            llm._compile(SamplingParams(structured_outputs=so))
        except ValueError:
            continue
        taken.append(schema)
        if len(taken) == count:
            break
    return taken


def synchronous(structured):
    """Make the worker compile inside `add`, in the step the request arrives in."""
    add = structured.add

    def add_and_wait(request_id, grammar, replay):
        error = add(request_id, grammar, replay)
        if error is None and request_id in structured._pending:
            error = structured._resolve(request_id)
        return error

    structured.add = add_and_wait
    return lambda: setattr(structured, "add", add)


def trial(llm, schema: dict, tag: str, prompt_ids: list[int], n_plain: int) -> float:
    """Worst step gap after the arrival / median gap before it."""
    from splitserve import SamplingParams, StructuredOutputsParams
    from splitserve.common.messages_proto import generate_request_from_proto
    from splitserve.protos import scheduler_pb2

    sched = llm.engine.scheduler
    plain = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True).to_proto()
    for i in range(n_plain):
        sched.add_request(
            generate_request_from_proto(
                scheduler_pb2.GenerateRequest(
                    request_id=f"{tag}-p{i}",
                    prompt_token_ids=prompt_ids[:24],
                    sampling_params=plain,
                )
            )
        )
    schema = {**schema, "title": tag}  # a new handle: nothing cached anywhere
    sp = SamplingParams(
        max_tokens=8, structured_outputs=StructuredOutputsParams(json=schema, backend="xgrammar")
    )
    grammar = llm._compile(sp)  # the tokenizer service's compile, outside the timed steps
    gaps: list[float] = []
    arrival = None
    last = time.perf_counter()
    while llm.engine.has_work:
        if len(gaps) == 8 and arrival is None:
            arrival = len(gaps)
            sched.add_request(
                generate_request_from_proto(
                    scheduler_pb2.GenerateRequest(
                        request_id=f"{tag}-s",
                        prompt_token_ids=prompt_ids,
                        sampling_params=sp.to_proto(),
                    )
                ),
                grammar,
            )
        for out in llm.engine.step():
            if out.error:
                raise RuntimeError(out.error)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    before = statistics.median(gaps[2:arrival])
    return max(gaps[arrival : arrival + 12]) / before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model")
    ap.add_argument("--schemas", type=int, default=4, help="largest schemas tried")
    ap.add_argument("--plain", type=int, default=8, help="unconstrained requests decoding")
    args = ap.parse_args()

    from splitserve import LLM
    from splitserve.testing.demo_model import build_model

    tmp = tempfile.TemporaryDirectory()
    sizes = SMALL_MODEL if args.small else MODEL
    path = build_model(pathlib.Path(tmp.name) / "m", "llama", **sizes)
    llm = LLM(str(path), kv_cache_memory=256 << 20, max_num_batched_tokens=64)
    structured = llm.engine.executor.runner.structured
    vocab = llm.get_tokenizer()
    short = vocab.encode("Write the JSON document:", add_special_tokens=True)
    long = list(range(10, 10 + 256))  # 256 tokens: four 64-token prefill chunks
    schemas = largest_schemas(llm, args.schemas)
    trial(llm, schemas[-1], "warm", short, args.plain)  # loads the worker's grammar tokenizer
    print(f"model {sizes}, {args.plain} decoding requests, {len(schemas)} largest schemas")
    for name, prompt in (("short prompt", short), ("long prompt (chunked)", long)):
        ratios: dict[str, list[float]] = {"background": [], "in-step": []}
        for i, schema in enumerate(schemas):
            for mode in ("background", "in-step"):
                undo = synchronous(structured) if mode == "in-step" else (lambda: None)
                try:
                    ratios[mode].append(
                        trial(llm, schema, f"{mode}{i}{name[0]}", prompt, args.plain)
                    )
                finally:
                    undo()
        print(
            f"{name}: worst step after the arrival / median step, compile in the background "
            f"{statistics.median(ratios['background']):.1f}x, in the step "
            f"{statistics.median(ratios['in-step']):.1f}x (medians over {len(schemas)} schemas)"
        )
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
