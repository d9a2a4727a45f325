"""One distribution, `splitserve`: the root folders import as splitserve.<folder> only."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    for folder in ["protos", "gateway", "scheduler", "worker", "tokenizer_svc", "kernels"]:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            name = "splitserve." + ".".join(rel.parts)
            assert name in listed, f"{name} missing from [tool.setuptools] packages"
            assert dirs[name] == str(rel).replace("\\", "/")


def test_no_bare_top_level_service_packages():
    # From a neutral folder, none of the service folders imports as a top-level package
    # (Hugging Face's own `kernels` may: transformers depends on it).
    code = (
        "import importlib.util, json, sys; sys.path = [p for p in sys.path if p not in ('', '.')];"
        "specs = {n: importlib.util.find_spec(n) for n in ('kernels', 'scheduler', 'worker',"
        " 'gateway', 'protos', 'tokenizer_svc')};"
        "print(json.dumps({n: s.origin for n, s in specs.items() if s is not None}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    found = json.loads(out.stdout)
    assert not [n for n, origin in found.items() if ROOT in pathlib.Path(origin).parents], found
    for name in ("splitserve.kernels", "splitserve.scheduler", "splitserve.gateway"):
        assert importlib.util.find_spec(name) is not None


def test_console_script_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("splitserve ")
