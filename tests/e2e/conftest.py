"""`splitserve serve` on a tiny model: real processes on loopback, the official clients."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx
import pytest

from splitserve.entrypoints.launcher import free_port
from splitserve.testing.demo_model import build_model


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} while waiting for {what}")
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def stream_signalling(
    url: str, model: str, max_tokens: int, pid: int, sig
) -> tuple[list[str], float]:
    """Stream a completion of `max_tokens` (ignore_eos); after its second SSE event send
    `sig` to `pid`. Returns the event payloads to the end of the stream and when the signal
    went."""
    body = {
        "model": model,
        "prompt": "hi",
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    events: list[str] = []
    sent_at = None
    with (
        httpx.Client(timeout=60) as h,
        h.stream("POST", url + "/v1/completions", json=body) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    os.kill(pid, sig)
                    sent_at = time.monotonic()
    assert sent_at is not None, f"the stream ended after {len(events)} events: {events}"
    return events, sent_at


def children_of(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [int(x) for x in out.split()]


class Server:
    def __init__(
        self,
        model: pathlib.Path,
        extra: list[str],
        log: pathlib.Path,
        cwd: pathlib.Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.scheduler_address = f"127.0.0.1:{free_port()}"
        self.tokenizer_address = f"127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model)
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "splitserve.entrypoints.cli",
            "serve",
            str(model),
            "--port",
            str(self.port),
            "--scheduler-address",
            self.scheduler_address,
            "--tokenizer-address",
            self.tokenizer_address,
            "--kv-cache-memory",
            "4MiB",
            "--max-model-len",
            "512",
            "--block-size",
            "16",
            "--max-num-seqs",
            "32",
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            # A stats line every second (test_scheduling_policy.py reads one from the log).
            env={
                **(os.environ if env is None else env),
                "PYTHONUNBUFFERED": "1",
                "VLLM_LOG_STATS_INTERVAL": "1",
            },
            cwd=cwd,
        )

        def healthy():
            try:
                return httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(healthy, 240, "the stack to become healthy", self.proc)
        except AssertionError:
            self.proc.kill()
            raise AssertionError(log.read_text()[-4000:]) from None
        self.children = children_of(self.proc.pid)

    def scheduler_stats(self):
        import grpc

        from splitserve.protos import scheduler_pb2, scheduler_pb2_grpc

        with grpc.insecure_channel(self.scheduler_address) as ch:
            return scheduler_pb2_grpc.SchedulerServiceStub(ch).GetStats(
                scheduler_pb2.GetStatsRequest(), timeout=5
            )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    return build_model(
        tmp_path_factory.mktemp("e2e") / "tiny-llama",
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        eos_token_ids=[1, 4],
    )


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    # NOTE: a small waiting queue, so that a burst (test_overload.py) meets deliberate 503s.
    # tool_choice "auto" is read with the hermes parser (test_auto_tools.py).
    flags = [
        "--max-waiting-requests",
        "16",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ]
    s = Server(tiny_model, flags, tmp_path_factory.mktemp("logs") / "serve.log")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
