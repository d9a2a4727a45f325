"""bench/gpu_check.sh, the one command for a CUDA machine: it parses, and without CUDA it says
so and stops before running anything (exit 2)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the real check on a GPU")
def test_without_cuda_it_stops_with_exit_2(tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device" in (tmp_path / "summary.txt").read_text()
    assert not (tmp_path / "kernel_tests.log").exists()
