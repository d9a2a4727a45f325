"""splitserve/entrypoints/child_process.py: children never import a repository folder as a package, and
the launcher finds the line a dead child died of."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

from splitserve.entrypoints.child_process import child_env, last_error_line, python_command

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMPORTS = "import splitserve.worker.models; import transformers.models.llama.modeling_llama"


def _without_safe_path() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}


def test_hugging_face_kernels_is_installed_so_the_root_folder_could_shadow_it():
    # The hazard the rest of this file guards against: transformers imports Hugging Face's
    # `kernels`, and the repository root has a `kernels/` folder of its own.
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and ROOT not in pathlib.Path(spec.origin).parents, spec
    assert (ROOT / "kernels" / "__init__.py").exists()


def test_a_child_started_from_the_root_imports_the_installed_packages():
    env = child_env()
    assert env["PYTHONSAFEPATH"] == "1"
    ok = subprocess.run(
        [sys.executable, "-c", IMPORTS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    # The control: the same child without the safe path picks up the repository's folder.
    bad = subprocess.run(
        [sys.executable, "-c", IMPORTS],
        cwd=ROOT,
        env=_without_safe_path(),
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "kernels" in bad.stderr, bad.stderr[-2000:]


def test_python_command_runs_the_module_in_safe_path_mode():
    cmd = python_command("splitserve.entrypoints.cli", "--version")
    assert cmd == [sys.executable, "-P", "-m", "splitserve.entrypoints.cli", "--version"]
    code = "import sys; print(sys.flags.safe_path, sys.path)"
    probe = subprocess.run(
        [*cmd[:2], "-c", code], cwd=ROOT, env=_without_safe_path(), capture_output=True, text=True
    )
    assert probe.stdout.startswith("True"), probe.stderr
    assert f"'{ROOT}'" not in probe.stdout and "''" not in probe.stdout


def test_last_error_line_is_the_exception_of_the_last_real_traceback():
    text = """INFO starting
Traceback (most recent call last):
  File "a.py", line 1, in <module>
    import kernels
    ^^^^^^^^^^^^^^
ImportError: cannot import name 'CUDAProperties' from 'kernels'
INFO [gateway] shutting down
Exception ignored in: <function Server.__del__ at 0x7f>
Traceback (most recent call last):
  File "b.py", line 2, in __del__
RuntimeError: Event loop is closed
"""
    assert (
        last_error_line(text) == "ImportError: cannot import name 'CUDAProperties' from 'kernels'"
    )


def test_last_error_line_takes_the_outer_exception_of_a_chain():
    text = """Traceback (most recent call last):
  File "a.py", line 1
KeyError: 'x'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "a.py", line 3
ValueError: no x
"""
    assert last_error_line(text) == "ValueError: no x"


def test_last_error_line_without_a_traceback():
    logged = "2026 INFO [scheduler] up\n2026 ERROR [scheduler] worker rank 0 cannot serve\nbye\n"
    assert last_error_line(logged) == "2026 ERROR [scheduler] worker rank 0 cannot serve"
    assert last_error_line("one\n\ntwo\n\n") == "two"
    assert last_error_line("") == ""
