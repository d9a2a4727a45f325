"""What a new user does first: `splitserve serve` from the repository root, on a fresh install
where transformers imports Hugging Face's `kernels` package; and what they see when a service
cannot start."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import httpx

from splitserve.entrypoints.launcher import free_port

from .conftest import Server

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_serve_from_the_repository_root_answers_a_llama_request(tiny_model, tmp_path):
    # The launcher started as `python -m` from the root, without the PYTHONSAFEPATH the test
    # run sets: the root is first on its sys.path and on any child's that does not opt out.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    assert (ROOT / "kernels").is_dir()
    assert "LlamaForCausalLM" in (tiny_model / "config.json").read_text()
    server = Server(tiny_model, [], tmp_path / "serve.log", cwd=ROOT, env=env)
    try:
        r = httpx.post(
            server.url + "/v1/completions",
            json={"model": server.model, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        assert server.stop() == 0
    assert "CUDAProperties" not in server.log.read_text()


def test_a_service_that_dies_during_start_up_is_named_with_its_exception(tiny_model):
    # A pinned scheduler port that is taken: the scheduler cannot bind and exits.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "splitserve.entrypoints.cli",
                "serve",
                str(tiny_model),
                "--kv-cache-memory",
                "4MiB",
                "--scheduler-address",
                f"127.0.0.1:{port}",
                "--port",
                str(free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    reason, where = lines[-2], lines[-1]
    assert reason.startswith("splitserve: scheduler exited with status 1 during start-up: ")
    assert f"Failed to bind to address 127.0.0.1:{port}" in reason
    log = pathlib.Path(where.split(" is in ", 1)[1].split(" (", 1)[0])
    assert log.name == "scheduler.log"
    assert "Traceback (most recent call last)" in log.read_text()
    assert sorted(p.name for p in log.parent.iterdir()) == [
        "gateway.log",
        "scheduler.log",
        "tokenizer.log",
        "worker0.log",
    ]
