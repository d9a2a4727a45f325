"""`splitserve serve`: start the tokenizer service, workers, scheduler and gateway as
separate processes on loopback, wait until the gateway is healthy, and stop them all
together (Ctrl-C / SIGTERM, or any one of them dying)."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from splitserve.entrypoints.child_process import LoggedChild, child_env, python_command
from splitserve.entrypoints.config_cli import build_config, config_to_argv, service_configs

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
DEMO_NAME = "splitserve-demo"
"""The model name clients use for the built-in demo model."""


def _die_with_parent() -> None:
    """Children get SIGTERM if the launcher dies without cleaning up (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Stack:
    """The child processes of one `serve`, in start order, each logging to its own file in
    `log_dir` as well as to the terminal."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[LoggedChild] = []

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen]]:
        return [(c.name, c.proc) for c in self.children]

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        cmd = python_command("splitserve.entrypoints.cli", *argv)
        logger.debug("starting %s: %s", name, " ".join(cmd))
        self.children.append(
            LoggedChild(
                name,
                cmd,
                self.log_dir / f"{name}.log",
                child_env(env),
                preexec_fn=_die_with_parent,
            )
        )

    def send_signal(self, name: str, signum: int) -> None:
        """Send `signum` to the child called `name`, if it still runs."""
        for n, p in self.procs:
            if n == name and p.poll() is None:
                p.send_signal(signum)

    def dead(self) -> LoggedChild | None:
        """The child that exited first, if any has."""
        exited = [c for c in self.children if c.exited()]
        return min(exited, key=lambda c: c.exited_at) if exited else None

    def stop(self, timeout: float = 20.0, drain_timeout: float = 0.0) -> None:
        """SIGTERM the gateway alone and wait while it drains (its in-flight requests need
        the services behind it), then the rest; whatever outlives its wait is killed."""
        gateway = [(n, p) for n, p in self.procs if n == "gateway"]
        self._terminate(gateway, drain_timeout + timeout)
        self._terminate([(n, p) for n, p in reversed(self.procs) if n != "gateway"], timeout)

    @staticmethod
    def _terminate(procs: list[tuple[str, subprocess.Popen]], timeout: float) -> None:
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                p.kill()
                p.wait()


def _healthy(url: str) -> bool:
    """Whether the gateway answers /health. Over TLS its certificate is not checked: it is
    our own child on a port we chose."""
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return r.status == 200
    except OSError:
        return False


def _accepts_connections(host: str, port: int) -> bool:
    """For a gateway that demands client certificates (which the launcher has none of): an
    accepted TCP connection says it is up, as uvicorn binds only once start-up is done."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _gpu_per_rank(worker_cfg) -> list[dict[str, str]] | None:
    """With several worker processes on CUDA, one visible GPU each (CUDA_VISIBLE_DEVICES),
    in global rank order (stage by stage, tensor-parallel ranks within a stage); None when
    they run on CPU or there is one worker."""
    pp = worker_cfg.world_size
    if pp == 1 or worker_cfg.device == "cpu":
        return None
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        if worker_cfg.device == "cuda":
            raise ValueError("--device cuda was asked for but no CUDA device is visible")
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    if len(ids) < pp:
        raise ValueError(
            f"--pipeline-parallel-size {worker_cfg.pipeline_parallel_size} x "
            f"--tensor-parallel-size {worker_cfg.tensor_parallel_size} needs one GPU per "
            f"worker ({pp}), but {len(ids)} are visible"
        )
    return [{"CUDA_VISIBLE_DEVICES": ids[rank]} for rank in range(pp)]


def serve(args: argparse.Namespace) -> int:
    gateway_cls, scheduler_cls, worker_cls, tokenizer_cls = service_configs()
    model = args.model_tag
    if model is None:
        from splitserve.testing.demo_model import demo_model_path

        print(
            f"splitserve: no model given; serving the built-in demo model as {DEMO_NAME!r}",
            flush=True,
        )
        model = str(demo_model_path())
    host = "127.0.0.1"
    # Internal services listen on loopback; --scheduler-address / --tokenizer-address pin
    # them (for gRPC clients that call the scheduler directly), otherwise free ports.
    tok_addr = getattr(args, "tokenizer_address", None) or f"{host}:{free_port()}"
    sched_addr = getattr(args, "scheduler_address", None) or f"{host}:{free_port()}"
    # Pipeline ranks meet at --distributed-init-method, or at --master-addr/--master-port;
    # given neither, at a free loopback port.
    rendezvous = (
        {"master_port": free_port()}
        if getattr(args, "pipeline_parallel_size", 1) * getattr(args, "tensor_parallel_size", 1) > 1
        and getattr(args, "distributed_init_method", None) is None
        and getattr(args, "master_port", None) is None
        else {}
    )
    tok_overrides = {} if getattr(args, "tokenizer", None) else {"tokenizer": model}
    tokenizer_cfg = build_config(tokenizer_cls, args, **tok_overrides)
    # The sampling rank compiles a direct Generate caller's constraint itself: with the backend
    # the tokenizer service resolved (--structured-outputs-config may have changed it).
    worker_cfg = build_config(
        worker_cls,
        args,
        model=model,
        guided_decoding_backend=tokenizer_cfg.guided_decoding_backend,
        **rendezvous,
        **tok_overrides,
    )
    tp = worker_cfg.tensor_parallel_size
    # One address per worker, global rank order; the scheduler gets each stage's driver.
    worker_addrs = [f"{host}:{free_port()}" for _ in range(worker_cfg.world_size)]
    rank_devices = _gpu_per_rank(worker_cfg)
    scheduler_cfg = build_config(scheduler_cls, args, worker_addresses=worker_addrs[::tp])
    # The demo model is served as DEMO_NAME unless the user names it.
    named = args.model_tag or getattr(args, "served_model_name", None)
    gateway_cfg = build_config(
        gateway_cls,
        args,
        model=model,
        scheduler_address=sched_addr,
        tokenizer_address=tok_addr,
        **({} if named else {"served_model_name": [DEMO_NAME]}),
    )
    if gateway_cfg.enable_lora:
        from splitserve.gateway.lora_registry import LoRARegistry

        LoRARegistry(gateway_cfg)  # a bad --lora-modules adapter fails before anything starts
    log = ["--log-level", args.log_level]
    # NOTE: a model that cannot load fails here, before any process starts or port opens.
    from splitserve.entrypoints.preflight import preflight

    preflight(worker_cfg, tokenizer_cfg)

    stack = Stack(Path(tempfile.mkdtemp(prefix="splitserve-logs-")))
    stop = {"signal": None}

    def on_signal(signum, _frame):
        if stop["signal"] is not None:
            # A second signal while the gateway drains: pass it on, the gateway then stops
            # at once (cancelling what is still in flight).
            stack.send_signal("gateway", signal.SIGTERM)
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    clean = False
    failure: tuple[LoggedChild, str] | None = None
    try:
        stack.spawn(
            "tokenizer", [*log, "tokenizer", "--address", tok_addr, *config_to_argv(tokenizer_cfg)]
        )
        for index, addr in enumerate(worker_addrs):
            rank, tp_rank = divmod(index, tp)
            stack.spawn(
                f"worker{rank}" + (f"-tp{tp_rank}" if tp_rank else ""),
                [
                    *log,
                    "worker",
                    model,
                    "--address",
                    addr,
                    "--rank",
                    str(rank),
                    "--tp-rank",
                    str(tp_rank),
                    *config_to_argv(worker_cfg, skip={"model", "rank", "tp_rank"}),
                ],
                env=rank_devices[index] if rank_devices else None,
            )
        stack.spawn(
            "scheduler",
            [*log, "scheduler", "--address", sched_addr, *config_to_argv(scheduler_cfg)],
        )
        # The API key goes through the environment: a command line is visible in `ps`.
        stack.spawn(
            "gateway",
            [*log, "gateway", *config_to_argv(gateway_cfg, skip={"api_key"})],
            env={"SPLITSERVE_API_KEY": gateway_cfg.api_key} if gateway_cfg.api_key else None,
        )
        scheme = "https" if gateway_cfg.ssl_certfile else "http"
        base = f"{scheme}://{gateway_cfg.host}:{gateway_cfg.port}"
        while not (
            _accepts_connections(gateway_cfg.host, gateway_cfg.port)
            if gateway_cfg.ssl_cert_reqs == 2
            else _healthy(base + "/health")
        ):
            if stop["signal"] is not None:
                clean = True
                return 0
            dead = stack.dead()
            if dead:
                failure = (dead, "during start-up")
                return 1
            time.sleep(0.25)
        print(
            f"splitserve: ready. OpenAI API at {base}/v1 serving {model!r}; "
            f"scheduler gRPC at {sched_addr}, tokenizer gRPC at {tok_addr}",
            flush=True,
        )
        while stop["signal"] is None:
            dead = stack.dead()
            if dead:
                failure = (dead, "while serving")
                return 1
            time.sleep(0.25)
        print("splitserve: stopping", flush=True)
        clean = True
        return 0
    finally:
        stack.stop(drain_timeout=gateway_cfg.drain_timeout_s)
        for s, h in old.items():
            signal.signal(s, h)
        if failure is not None:  # last, below what the others printed while stopping
            for child in stack.children:
                child.wait_output(1.0)
            _report_death(*failure)
        if clean:
            shutil.rmtree(stack.log_dir, ignore_errors=True)


def _report_death(child: LoggedChild, when: str) -> None:
    """One line naming the child and the exception it died of, then where its log is."""
    reason = child.failure_line() or "no error in its output"
    print(
        f"splitserve: {child.name} exited with status {child.proc.returncode} {when}: {reason}\n"
        f"splitserve: its full output is in {child.log_path} (every service's log is in "
        f"{child.log_path.parent})",
        file=sys.stderr,
        flush=True,
    )
