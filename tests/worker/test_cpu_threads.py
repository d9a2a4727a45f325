"""--cpu-omp-threads-bind: which cores a CPU worker's OpenMP threads are pinned to, and the
environment that pins them (set by the `worker` command before torch loads)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from splitserve.worker import cpu_threads
from splitserve.worker.config import WorkerConfig


def test_cpu_lists():
    assert cpu_threads.parse_cpu_list("0-3,6") == [0, 1, 2, 3, 6]
    assert cpu_threads.parse_cpu_list("5") == [5]
    for bad in ("a", "3-1", "0,0", "-1", "1-"):
        with pytest.raises(ValueError, match="bad CPU list"):
            cpu_threads.parse_cpu_list(bad)


def test_config_checks_the_value():
    WorkerConfig(cpu_omp_threads_bind="0-1")
    WorkerConfig(cpu_omp_threads_bind="nobind")
    with pytest.raises(ValueError, match="'fast'"):
        WorkerConfig(cpu_omp_threads_bind="fast")


def test_auto_leaves_one_core_and_splits_ranks():
    cores = {0, 1, 2, 3, 4, 5, 6, 7, 8}
    assert cpu_threads.cores_for("auto", "cpu", available=cores) == list(range(8))
    assert cpu_threads.cores_for("auto", "cpu", 1, 2, available=cores) == [4, 5, 6, 7]
    assert cpu_threads.cores_for("auto", "cpu", available={0, 1, 2, 3}) == [0, 1, 2]
    assert cpu_threads.cores_for("auto", "cpu", available={0, 1, 2}) == []  # too small
    assert cpu_threads.cores_for("auto", "cpu", 1, 4, available=cores) == [2, 3]
    assert cpu_threads.cores_for("auto", "cuda", available=cores) == []
    assert cpu_threads.cores_for("nobind", "cpu", available=cores) == []
    assert cpu_threads.cores_for("2,5", "cpu", available=cores) == [2, 5]


def test_every_worker_of_the_grid_gets_its_own_cores(monkeypatch):
    from splitserve.entrypoints.cli import bind_openmp_threads
    from splitserve.worker.config import WorkerConfig

    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda _: set(range(9)))
    monkeypatch.setattr(cpu_threads, "_cuda_visible", lambda: False)
    got = {}
    for rank in range(2):
        for tp_rank in range(2):
            env: dict[str, str] = {}
            config = WorkerConfig(
                model="m", pipeline_parallel_size=2, rank=rank, tensor_parallel_size=2,
                tp_rank=tp_rank, device="cpu",
            )  # fmt: skip
            bind_openmp_threads(config, env)
            got[rank, tp_rank] = env["OMP_PLACES"]
    # 8 usable cores over 4 processes, global rank order (stage 1's peer is the last).
    assert got == {(0, 0): "{0},{1}", (0, 1): "{2},{3}", (1, 0): "{4},{5}", (1, 1): "{6},{7}"}


def test_environment_and_the_users_choice():
    env: dict[str, str] = {}
    assert cpu_threads.apply("1,3", "cpu", environ=env) == [1, 3]
    assert env == {"OMP_PLACES": "{1},{3}", "OMP_PROC_BIND": "close", "OMP_NUM_THREADS": "2"}
    env = {"OMP_PROC_BIND": "spread"}
    assert cpu_threads.apply("1,3", "cpu", environ=env) == []
    assert env == {"OMP_PROC_BIND": "spread"}
    env = {}
    assert cpu_threads.apply("nobind", "cpu", environ=env) == [] and env == {}


def test_the_worker_command_pins_before_torch_loads():
    # The command fails on the missing model, after the binding is set; torch must not be
    # loaded by then (OpenMP reads the variables once, at load).
    code = (
        "import os, sys\n"
        "for k in ('OMP_PLACES', 'OMP_PROC_BIND', 'OMP_NUM_THREADS'): os.environ.pop(k, None)\n"
        "from splitserve.entrypoints import cli\n"
        "cli.main(['worker', '/nonexistent/model', '--address', '127.0.0.1:1',\n"
        "          '--device', 'cpu', '--cpu-omp-threads-bind', '0'])\n"
        "print(os.environ.get('OMP_PLACES'), os.environ.get('OMP_NUM_THREADS'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[:2] == ["{0}", "1"], out.stderr


def test_in_process_llm_refuses_a_cpu_list():
    from splitserve import LLM

    with pytest.raises(ValueError, match="cannot pin"):
        LLM("/nonexistent/model", cpu_omp_threads_bind="0")
