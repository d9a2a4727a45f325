"""The gateway's CPU per streamed token, alone: old code against new in one run.

    python -P bench/gateway_cpu.py                        # this tree's gateway only
    python -P bench/gateway_cpu.py --baseline main        # and `main`'s gateway, alternating
    python -P bench/gateway_cpu.py --baseline main --stack   # whole stacks, alternating

What `bench/stack_overhead.py` measures includes the scheduler and the workers; here the
gateway is the only process under test. A fake scheduler in this process (gRPC, the real
`OutputBatch` stream) runs every submitted sequence for `--tokens` steps, one token a step,
each step one batch holding every running sequence, written as fast as the gateway reads it
(the same flow control as the real scheduler's stream); the real tokenizer service runs on the
tiny model of `stack_overhead.py` (it is idle while tokens stream: the gateway decodes them).
`--streams` concurrent streaming /v1/completions requests (token-id prompts, `ignore_eos`,
usage chunk) go to the gateway over HTTP from the same lean client `stack_overhead.py` uses,
and the gateway process's CPU seconds (/proc, user + system, all its threads) over the round
are divided by the tokens streamed.

With `--baseline REV`, the gateway, tokenizer_svc and splitserve/common of git revision REV
(extracted with `git archive` to a temporary folder) run in a second gateway process beside
this tree's, both against the same fake scheduler and tokenizer service, and the rounds
alternate between them. Prints each round's µs per token and the median ratio new/old. The
machine's other load moves wall time far more than CPU time, but not nothing: compare the two
within one run.

The fake scheduler sends every token in its own step, so no stream ever gets two tokens in one
write. A real scheduler folds steps when the gateway falls behind, and a gateway's cost per
token depends on how often that happens. `--stack` measures that too: whole `splitserve serve`
stacks of `stack_overhead.py` (this tree's, then REV's packages above in every process),
alternating, `--rounds` stacks each, two 256 x 128 rounds in each, with every process's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the bench folder only

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from stack_overhead import (  # noqa: E402
    TINY_MODEL,
    LeanClient,
    model_folder,
    request_body,
    run_client,
)

from splitserve.entrypoints.launcher import free_port  # noqa: E402
from splitserve.protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
_LENGTH = int(common_pb2.FinishReason.FINISH_REASON_LENGTH)

# A sitecustomize that takes three packages from another source tree (ROOT) in every process.
_OLD_TREE_SITE = """
import importlib.machinery, importlib.util, sys
ROOT = {root!r}
DIRS = {{"splitserve.gateway": ROOT + "/gateway", "splitserve.tokenizer_svc":
        ROOT + "/tokenizer_svc", "splitserve.common": ROOT + "/splitserve/common"}}

class OldTree:
    def find_spec(self, name, path=None, target=None):
        for pkg, folder in DIRS.items():
            if name == pkg:
                return importlib.util.spec_from_file_location(
                    name, folder + "/__init__.py", submodule_search_locations=[folder])
            if name.startswith(pkg + "."):
                sub = name[len(pkg) + 1:].split(".")
                return importlib.machinery.PathFinder.find_spec(name, ["/".join([folder, *sub[:-1]])])
        return None

sys.meta_path.insert(0, OldTree())
"""


def old_tree_env(rev: str, folder: str) -> dict[str, str]:
    """The environment of a process that runs `rev`'s gateway, tokenizer_svc and common."""
    tree = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "gateway", "tokenizer_svc", "splitserve/common"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=tree, check=True)
    site = pathlib.Path(folder) / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_OLD_TREE_SITE.format(root=folder))
    return {**os.environ, "PYTHONPATH": str(site)}


def cpu_times(pid: int, tick: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / tick, int(fields[12]) / tick


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Just enough of the scheduler for a gateway streaming completions: every submitted
    sequence gets `tokens` steps of one random token each (then finish LENGTH), and each
    step is one `OutputBatch` with every running sequence of the stream."""

    def __init__(self, vocab: int, max_model_len: int, step_s: float) -> None:
        self.vocab = vocab
        self.step_s = step_s
        self.max_model_len = max_model_len
        self.streams: dict[str, dict] = {}  # stream id -> {request id: [prompt len, left, rng]}
        self.wake: dict[str, asyncio.Event] = {}

    async def GetModelInfo(self, request, context):
        return scheduler_pb2.ModelInfo(
            max_model_len=self.max_model_len,
            vocab_size=self.vocab,
            eos_token_ids=[2],
            model=str(model_folder()),
            max_logprobs=20,
        )

    async def GetStats(self, request, context):
        return scheduler_pb2.SchedulerStats(num_total_blocks=100, num_free_blocks=100)

    async def Abort(self, request, context):
        for running in self.streams.values():
            running.pop(request.request_id, None)
        return scheduler_pb2.AbortResponse(aborted=True)

    async def Submit(self, request, context):  # a baseline gateway's way (one call each)
        if not self._start(request):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no such output stream")
        return scheduler_pb2.SubmitResponse()

    async def SubmitStream(self, request_iterator, context):
        async for request in request_iterator:
            self._start(request)  # NOTE: as the scheduler does, one naming no stream is dropped
        return scheduler_pb2.SubmitResponse()

    def _start(self, request) -> bool:
        running = self.streams.get(request.stream_id)
        if running is None:
            return False
        req = request.request
        tokens = req.sampling_params.max_tokens
        running[req.request_id] = [len(req.prompt_token_ids), tokens, random.Random(req.request_id)]
        self.wake[request.stream_id].set()
        return True

    async def StreamOutputs(self, request, context):
        running: dict = {}
        wake = asyncio.Event()
        self.streams[request.stream_id] = running
        self.wake[request.stream_id] = wake
        heartbeat = request.heartbeat_interval_s or 1.0
        try:
            yield scheduler_pb2.OutputBatch()
            first_step = True
            loop = asyncio.get_running_loop()
            next_step = loop.time()
            while True:
                if not running:
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), heartbeat)
                    except TimeoutError:
                        yield scheduler_pb2.OutputBatch()
                        continue
                    next_step = loop.time()
                # NOTE: a fixed step rate the gateway keeps up with, so each token is handled
                # on its own (a gateway that fell behind would fold several into one chunk and
                # look cheaper per token the slower it is).
                next_step += self.step_s
                await asyncio.sleep(max(0.0, next_step - loop.time()))
                batch = scheduler_pb2.OutputBatch()
                for rid, state in list(running.items()):
                    num_prompt, left, rng = state
                    left -= 1
                    state[1] = left
                    out = batch.outputs.add(request_id=rid).output
                    out.token_ids.append(rng.randrange(10, self.vocab))
                    out.num_prompt_tokens = num_prompt
                    if first_step:
                        out.queue_time_s = 0.001
                    if left <= 0:
                        out.finish_reason = _LENGTH
                        out.prefill_time_s = 0.001
                        out.decode_time_s = 0.1
                        del running[rid]
                first_step = False
                yield batch
        finally:
            del self.streams[request.stream_id]


async def start_scheduler(port: int, step_s: float) -> grpc.aio.Server:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
        FakeScheduler(TINY_MODEL["vocab_size"], 4096, step_s), server
    )
    checker = health.aio.HealthServicer()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


class Gateway:
    """One `splitserve gateway` process: this tree's, or another tree's (`env`)."""

    def __init__(
        self, name: str, scheduler: str, tokenizer: str, env: dict | None, profile: str = ""
    ) -> None:
        self.name = name
        self.port = free_port()
        args = ["--log-level", "warning", "gateway", "--port", str(self.port)]
        args += ["--scheduler-address", scheduler, "--tokenizer-address", tokenizer]
        args += ["--disable-uvicorn-access-log"]
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        cmd = [sys.executable, "-P", *prof, "-m", "splitserve.entrypoints.cli", *args]
        self.proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env=env)
        self.us_per_token: list[float] = []


async def wait_ready(gw: Gateway, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status = (await reader.read())[:12]
            writer.close()
            if status.endswith(b"200"):
                return
        except OSError:
            pass
        if gw.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the {gw.name} gateway did not start")
        await asyncio.sleep(0.3)


async def drive(gw: Gateway, prompts: list[list[int]], tokens: int) -> None:
    client = LeanClient("127.0.0.1", gw.port)

    async def one(prompt: list[int]) -> None:
        body = request_body(str(model_folder()), prompt, tokens)
        res = await client.stream("/v1/completions", json.dumps(body).encode())
        if not res.done or res.usage is None or res.usage["completion_tokens"] != tokens:
            raise RuntimeError(f"{gw.name}: a bad stream (usage {res.usage}, done {res.done})")
        if res.finish_reasons != ["length"] or not 0 < res.text_events <= tokens:
            raise RuntimeError(f"{gw.name}: finish {res.finish_reasons}, {res.text_events} events")

    try:
        await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


async def main_async(args: argparse.Namespace) -> None:
    tick = os.sysconf("SC_CLK_TCK")
    path = model_folder()
    sched_port, tok_port = free_port(), free_port()
    scheduler = await start_scheduler(sched_port, args.step_ms / 1e3)
    tok_cmd = [sys.executable, "-P", "-m", "splitserve.entrypoints.cli", "--log-level"]
    tok_cmd += [
        "warning",
        "tokenizer",
        "--tokenizer",
        str(path),
        "--address",
        f"127.0.0.1:{tok_port}",
    ]
    tokenizer = subprocess.Popen(tok_cmd, cwd=tempfile.gettempdir())
    gateways: list[Gateway] = []
    tmp = tempfile.TemporaryDirectory(prefix="gateway-cpu-")
    try:
        addrs = (f"127.0.0.1:{sched_port}", f"127.0.0.1:{tok_port}")
        gateways.append(Gateway("new", *addrs, None, args.profile))
        if args.baseline:
            env = old_tree_env(args.baseline, tmp.name)
            gateways.append(Gateway(f"old ({args.baseline})", *addrs, env))
        for gw in gateways:
            await wait_ready(gw)
        prompts = [
            [random.Random(i).randrange(10, TINY_MODEL["vocab_size"]) for _ in range(16)]
            for i in range(args.streams)
        ]
        for gw in gateways:  # warm-up: imports, caches, connections
            await drive(gw, prompts, 8)
        total = args.streams * args.tokens
        for k in range(args.rounds):
            order = gateways if k % 2 == 0 else gateways[::-1]
            line = []
            for gw in order:
                u0, s0 = cpu_times(gw.proc.pid, tick)
                t0 = time.perf_counter()
                await drive(gw, prompts, args.tokens)
                wall = time.perf_counter() - t0
                u1, s1 = cpu_times(gw.proc.pid, tick)
                us = (u1 - u0 + s1 - s0) / total * 1e6
                gw.us_per_token.append(us)
                line.append(
                    f"{gw.name} {us:.1f} µs/token (system {(s1 - s0) / total * 1e6:.1f}; "
                    f"{total / wall:.0f} tok/s)"
                )
            print(f"round {k}: " + ", ".join(line), flush=True)
    finally:
        for gw in gateways:
            gw.proc.terminate()
        tokenizer.terminate()
        for p in [*(gw.proc for gw in gateways), tokenizer]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        await scheduler.stop(0)
        tmp.cleanup()
    print(
        f"{args.streams} streams x {args.tokens} tokens, {args.rounds} rounds; gateway CPU "
        "per streamed token (median of rounds):"
    )
    for gw in gateways:
        print(f"  {gw.name}: {statistics.median(gw.us_per_token):.1f} µs")
    if len(gateways) == 2:
        new, old = (statistics.median(g.us_per_token) for g in gateways)
        ratios = [n / o for n, o in zip(gateways[0].us_per_token, gateways[1].us_per_token)]
        print(f"  new/old = {new / old:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")


def run_stacks(args: argparse.Namespace) -> None:
    """`--stack`: whole stacks, this tree's and `--baseline`'s, alternating."""
    import stack_overhead

    path = model_folder()
    prompts = stack_overhead.prompts_for(args.streams, 16, TINY_MODEL["vocab_size"])
    total = args.streams * args.tokens
    gateway_us: dict[str, list[float]] = {"new": [], "old": []}
    with tempfile.TemporaryDirectory(prefix="gateway-cpu-") as tmp:
        old_env = old_tree_env(args.baseline, tmp)
        for k in range(2 * args.rounds):
            name = ("new", "old")[k % 2]
            saved = os.environ.copy()
            if name == "old":  # NOTE: `Stack` starts `splitserve serve` with this environment
                os.environ.update(old_env)
            try:
                stack = stack_overhead.Stack(path, "512MiB", [])
            finally:
                os.environ.clear()
                os.environ.update(saved)
            try:
                stack.wait_ready()
                run_client(stack.run(prompts, 8))  # warm-up
                for _ in range(2):
                    before = stack._cpu_now()
                    rate = run_client(stack.run(prompts, args.tokens))
                    cpu = {n: v - before.get(n, v) for n, v in stack._cpu_now().items()}
                    gateway_us[name].append(cpu["gateway"] / total * 1e6)
                    parts = ", ".join(f"{n} {v:.2f}" for n, v in sorted(cpu.items()))
                    print(
                        f"{name}: {rate:.0f} tok/s, gateway {gateway_us[name][-1]:.1f} µs/token;"
                        f" CPU s: {parts}",
                        flush=True,
                    )
            finally:
                stack.stop()
    new, old = (statistics.median(gateway_us[n]) for n in ("new", "old"))
    print(
        f"full stacks, {args.streams} streams x {args.tokens} tokens, {2 * args.rounds} rounds "
        f"each: gateway CPU per token (median) new {new:.1f} µs, old ({args.baseline}) "
        f"{old:.1f} µs, new/old = {new / old:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=256, help="concurrent streaming requests")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--rounds", type=int, default=4, help="measured rounds (each gateway)")
    ap.add_argument(
        "--step-ms",
        type=float,
        default=25.0,
        help="the fake scheduler's step interval (one token of every running sequence a step)",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="write a cProfile of this tree's gateway here (it slows that gateway down)",
    )
    ap.add_argument(
        "--baseline", default="", help="a git revision whose gateway runs beside this tree's"
    )
    ap.add_argument(
        "--stack",
        action="store_true",
        help="whole stacks instead (with --baseline): --rounds stacks of each, alternating",
    )
    args = ap.parse_args()
    if args.stack:
        if not args.baseline:
            ap.error("--stack compares with a --baseline revision")
        run_stacks(args)
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
