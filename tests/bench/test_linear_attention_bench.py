"""bench/linear_attention.py: the GDN GPU part's measurements run end to end (on CPU under the
Triton interpreter, tiny shapes), so the script is ready when a device is lent, and its CLI
refuses contradictory flags."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "linear_attention.py"

PROBE = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("linear_attention", {str(SCRIPT)!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
bench._gdn_gpu_chunk(2, 20, 1, device="cpu", dtype=torch.float32, shapes=(1, 2, 16, 16))
bench._gdn_gpu_step(3, 1, device="cpu", dtype=torch.float32, shapes=(1, 2, 16, 16))
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # -P and a neutral cwd: the repository's folders must not shadow installed packages.
    return subprocess.run(
        [sys.executable, "-P", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd="/tmp",
    )


def test_gdn_device_measurements_run_under_the_interpreter():
    r = _run(["-c", PROBE])
    assert r.returncode == 0, r.stderr
    assert "cpu gated delta rule 2x20 tokens (1/2 heads of 16/16, float32): triton" in r.stdout
    assert "torch/triton" in r.stdout and "triton/copy" in r.stdout
    assert "cpu gated delta step, batch 3:" in r.stdout


def test_contradictory_flags_are_refused():
    r = _run([str(SCRIPT), "--cpu-only", "--gpu-only"])
    assert r.returncode == 2
    assert "--cpu-only and --gpu-only exclude each other" in r.stderr
