"""Engine fields across real processes: one `serve` flag reaches every service that takes it,
and a gateway started alone with a conflicting value is refused, naming both values."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import grpc
import httpx
import pytest

from splitserve.entrypoints.launcher import free_port
from splitserve.protos import scheduler_pb2, scheduler_pb2_grpc

from .conftest import Server

SERVICES = ("gateway", "scheduler", "worker", "tokenizer")


@pytest.fixture(scope="module")
def engine_server(tiny_model, tmp_path_factory):
    flags = ["--max-num-batched-tokens", "1024", "--max-logprobs", "3"]
    s = Server(tiny_model, flags, tmp_path_factory.mktemp("logs") / "engine.log")
    yield s
    s.stop()


def _service_argv(pid: int) -> tuple[str, list[str]]:
    """(service, its flags) of a child `serve` started."""
    argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    at = next(i for i, a in enumerate(argv) if a in SERVICES)
    return argv[at], argv[at + 1 :]


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_one_serve_flag_reaches_every_service_that_takes_it(engine_server):
    children = dict(_service_argv(pid) for pid in engine_server.children)
    assert set(children) == set(SERVICES)
    for name in ("scheduler", "worker"):
        assert _flag(children[name], "--max-num-batched-tokens") == "1024", name
    for name in ("gateway", "scheduler", "worker"):
        assert _flag(children[name], "--max-logprobs") == "3", name
    # The gateway and the tokenizer service take no step budget.
    assert _flag(children["gateway"], "--max-num-batched-tokens") is None
    assert _flag(children["tokenizer"], "--max-logprobs") is None
    with grpc.insecure_channel(engine_server.scheduler_address) as channel:
        info = scheduler_pb2_grpc.SchedulerServiceStub(channel).GetModelInfo(
            scheduler_pb2.GetModelInfoRequest(), timeout=30
        )
    assert info.engine.max_num_batched_tokens == 1024 and info.engine.max_logprobs == 3
    assert {"max_num_batched_tokens", "max_logprobs"} <= set(info.engine.fixed_fields)
    r = httpx.post(
        engine_server.url + "/v1/completions",
        json={"model": engine_server.model, "prompt": "hi", "max_tokens": 1, "logprobs": 4},
        timeout=60,
    )
    assert r.status_code == 400 and "3" in r.json()["error"]["message"]


def test_a_gateway_with_a_conflicting_field_is_refused(engine_server):
    cmd = [
        sys.executable,
        "-m",
        "splitserve.entrypoints.cli",
        "gateway",
        "--port",
        str(free_port()),
        "--scheduler-address",
        engine_server.scheduler_address,
        "--tokenizer-address",
        engine_server.tokenizer_address,
        "--max-logprobs",
        "5",
        "--startup-timeout-s",
        "60",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "max_logprobs: gateway 5, scheduler 3" in done.stderr, done.stderr[-3000:]
