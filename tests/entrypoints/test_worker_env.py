"""A worker process's OpenMP threads sleep between steps unless the user says otherwise."""

from __future__ import annotations

import subprocess
import sys

from splitserve.entrypoints.cli import quiet_openmp_waits


def test_passive_by_default_and_the_users_choice_kept():
    env: dict[str, str] = {}
    quiet_openmp_waits(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    quiet_openmp_waits(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_worker_command_sets_it():
    # The worker command fails on the missing model, after the policy is set (it must come
    # before torch loads: OpenMP reads the variable once, at load).
    code = (
        "import os, sys; os.environ.pop('OMP_WAIT_POLICY', None)\n"
        "from splitserve.entrypoints import cli\n"
        "cli.main(['worker', '/nonexistent/model', '--address', '127.0.0.1:1'])\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[:1] == ["PASSIVE"], out.stderr
