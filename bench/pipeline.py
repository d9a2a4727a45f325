"""Pipeline parallelism: output tokens/s at P = 1 and P = 2 on one workload, and how long
each stage sat idle.

    python bench/pipeline.py                       # 8-layer 512-wide Llama, 64 requests
    python bench/pipeline.py --small               # a quick run on a tiny model

Each P runs real `splitserve worker` processes (one per rank, gloo between them on CPU) under
the real scheduler core (EngineCore + the gRPC executor, in this process, as the scheduler
service runs it). Every stage gets the same number of CPU threads (`--threads-per-stage`), as
every stage would get its own GPU. The workload: `--requests` concurrent greedy requests with
prompts of `--prompt-len` tokens (±50%) and `--output-len` output tokens each (`ignore_eos`).
After a warm-up, the workers' stage counters are reset and the timed run starts.

Idle time is measured inside each worker (`WorkerService.GetStageStats`): waiting for the
previous rank's hidden states, for earlier sends to be taken, and for the scheduler's next
step, against the wall time from its first to its last step. Prints tokens/s per P, the
ratio P2/P1, and per stage the busy and idle fractions.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

from splitserve.common.messages_proto import generate_request_from_proto
from splitserve.entrypoints.launcher import free_port

MODEL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8)
SMALL_MODEL = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4
)


def build_checkpoint(out: pathlib.Path, small: bool) -> pathlib.Path:
    import torch
    import transformers

    if (out / "config.json").exists():
        return out
    shape = SMALL_MODEL if small else MODEL
    config = transformers.LlamaConfig(
        vocab_size=4096,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=1024,
        initializer_range=0.02,
        eos_token_id=2,
        **shape,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


def workload(n: int, prompt_len: int, vocab: int = 4096, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(3, vocab) for _ in range(rng.randint(prompt_len // 2, prompt_len * 3 // 2))]
        for _ in range(n)
    ]


class Workers:
    def __init__(self, model: pathlib.Path, pp: int, args, log_dir: pathlib.Path) -> None:
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(pp)]
        init = f"tcp://127.0.0.1:{free_port()}"
        threads = str(args.threads_per_stage)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "splitserve.entrypoints.cli",
                    "--log-level",
                    "warning",
                    "worker",
                    str(model),
                    "--address",
                    addr,
                    "--rank",
                    str(rank),
                    "--pipeline-parallel-size",
                    str(pp),
                    "--distributed-init-method",
                    init,
                    "--kv-cache-memory",
                    args.kv_cache_memory,
                    "--max-num-seqs",
                    str(args.requests),
                ],
                stdout=(log_dir / f"pp{pp}-rank{rank}.log").open("w"),
                stderr=subprocess.STDOUT,
                env=env,
            )
            for rank, addr in enumerate(self.addresses)
        ]

    def stage_stats(self, reset: bool = False):
        import grpc

        from splitserve.protos import worker_pb2, worker_pb2_grpc

        out = []
        for addr in self.addresses:
            with grpc.insecure_channel(addr) as ch:
                stub = worker_pb2_grpc.WorkerServiceStub(ch)
                out.append(stub.GetStageStats(worker_pb2.GetStageStatsRequest(reset=reset)))
        return out

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def generate(engine, prompts: list[list[int]], output_len: int, tag: str) -> int:
    from splitserve.protos import common_pb2, scheduler_pb2

    for i, prompt in enumerate(prompts):
        sp = common_pb2.SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        engine.scheduler.add_request(
            generate_request_from_proto(
                scheduler_pb2.GenerateRequest(
                    request_id=f"{tag}{i}", prompt_token_ids=prompt, sampling_params=sp
                )
            )
        )
    tokens = 0
    while engine.has_work:
        for out in engine.step():
            if out.error:
                raise RuntimeError(out.error)
            tokens += len(out.token_ids)
    return tokens


def run(model: pathlib.Path, pp: int, args, log_dir: pathlib.Path) -> tuple[float, list]:
    from splitserve.scheduler.config import SchedulerConfig
    from splitserve.scheduler.engine_core import EngineCore
    from splitserve.scheduler.executor_grpc import GrpcExecutor

    workers = Workers(model, pp, args, log_dir)
    try:
        config = SchedulerConfig(
            max_num_seqs=args.requests, max_num_batched_tokens=args.max_num_batched_tokens
        )
        engine = EngineCore(config, GrpcExecutor(workers.addresses, 600))
        prompts = workload(args.requests, args.prompt_len)
        generate(engine, prompts[: max(2, args.requests // 4)], 4, "warm")
        workers.stage_stats(reset=True)
        start = time.perf_counter()
        tokens = generate(engine, prompts, args.output_len, "r")
        seconds = time.perf_counter() - start
        stats = workers.stage_stats()
        engine.shutdown()
        return tokens / seconds, stats
    finally:
        workers.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model, for a quick run")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--threads-per-stage", type=int, default=1)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--pp", default="1,2", help="pipeline sizes to run, comma-separated")
    parser.add_argument("--model", type=pathlib.Path, help="a model folder (default: built)")
    args = parser.parse_args()

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model = args.model or build_checkpoint(root / "model", args.small)
    print(
        f"model {model.name}, {args.requests} requests, prompts ~{args.prompt_len} tokens, "
        f"{args.output_len} output tokens each, {args.threads_per_stage} thread(s) per stage; "
        f"logs in {root}",
        flush=True,
    )
    results = {}
    for pp in [int(p) for p in args.pp.split(",")]:
        tps, stats = run(model, pp, args, root)
        results[pp] = tps
        print(f"P={pp}: {tps:8.1f} output tokens/s")
        for s in stats:
            wall = s.wall_seconds or 1.0
            print(
                f"    rank {s.rank}: {s.num_steps} steps over {s.wall_seconds:.2f}s; busy "
                f"{s.compute_seconds / wall:6.1%}, idle {1 - s.compute_seconds / wall:6.1%} "
                f"(waiting for the previous rank {s.recv_wait_seconds / wall:6.1%}, "
                f"for sends {s.send_wait_seconds / wall:6.1%}, "
                f"for the next step {s.step_wait_seconds / wall:6.1%})",
                flush=True,
            )
    if 1 in results and 2 in results:
        print(f"P=2 / P=1 throughput: {results[2] / results[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
