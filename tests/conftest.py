"""Keeps the repository root off sys.path for the whole test run and every child it starts.

The service folders (`kernels`, `scheduler`, `worker`, ...) sit at the repository root. Put
there on sys.path, they shadow installed packages of the same names: transformers imports
Hugging Face's `kernels`. `python -m pytest` from the root puts the root first on sys.path;
pytest itself adds nothing (`--import-mode=importlib` in pyproject.toml). This file runs
before any test module imports transformers, drops the root, and sets PYTHONSAFEPATH so that
every Python child a test starts (`python -m splitserve.entrypoints.cli`, `python -c ...`) keeps it off
too, as splitserve's own launcher does (splitserve/entrypoints/child_process.py).
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _is_root(entry: str) -> bool:
    try:
        return pathlib.Path(entry or os.getcwd()).resolve() == ROOT
    except OSError:
        return False


sys.path[:] = [p for p in sys.path if not _is_root(p)]
os.environ["PYTHONSAFEPATH"] = "1"

_shadow = sys.modules.get("kernels")
if _shadow is not None and ROOT in pathlib.Path(getattr(_shadow, "__file__", "/") or "/").parents:
    raise RuntimeError(
        f"the repository's kernels/ folder was imported as the top-level `kernels` ({_shadow}) "
        "before the tests started: start pytest with `python -P -m pytest` or from another folder"
    )
