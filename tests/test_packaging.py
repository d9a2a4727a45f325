"""One distribution, `splitserve`: the root folders import as splitserve.<folder> only."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
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
        [sys.executable, "-m", "splitserve.entrypoints.cli", "--version"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.startswith("splitserve ")


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Set-up on a fresh machine")
    section = readme[start : readme.index("\n## ", start + 1)]
    blocks = section.split("```bash\n")[1:]
    return [b.split("```", 1)[0].strip() for b in blocks if "pip install" in b]


def test_readme_set_up_commands_and_ci_install_the_pinned_versions():
    serve, test = _setup_commands()
    for command in (serve, test):
        assert command.startswith("python -m pip install torch==2.13.0 && "), command
        assert "-c constraints.txt -e " in command, command
    assert serve.endswith("splitserve serve")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test, "the last line of .ci/run must be the README's test command"


def _upgrade_check():
    spec = importlib.util.spec_from_file_location("upgrade_check", ROOT / "tools/upgrade_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upgrade_check_reports_what_changed():
    uc = _upgrade_check()
    old = uc.parse("# pins\nTorch==2.13.0+cpu\nfoo_bar==1.0\ngone==3\n")
    new = uc.parse("torch==2.13.0\nfoo-bar==1.1\nnew==0.1 ; python_version >= '3.11'\n")
    assert old == {"torch": "2.13.0", "foo-bar": "1.0", "gone": "3"}
    assert uc.diff(old, new) == ["  ~ foo-bar 1.0 -> 1.1", "  - gone 3", "  + new 0.1"]


def test_constraints_pin_every_dependency_exactly():
    upgrade_check = _upgrade_check()
    text = (ROOT / "constraints.txt").read_text()
    pins = upgrade_check.parse(text)
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = cfg["dependencies"] + cfg["optional-dependencies"]["test"]
    names = {re.split(r"[<>=!~\[ ;]", spec)[0].replace("_", "-").lower() for spec in wanted}
    assert not names - pins.keys(), f"unpinned: {sorted(names - pins.keys())}"
    assert pins["torch"] == "2.13.0"
    # Every line is a comment or name==version (what pip freeze writes), nothing looser.
    for line in text.splitlines():
        assert line.startswith("#") or upgrade_check._LINE.match(line), line
    assert upgrade_check.render(pins) == text, "constraints.txt is not in the generated form"


def test_no_script_folder_shadows_an_installed_module():
    # `python bench/x.py` puts bench/ first on sys.path: a bench/kernels.py there was taken
    # for Hugging Face's `kernels` when transformers imported it.
    stems = sorted({p.stem for folder in ("bench", "tools") for p in (ROOT / folder).glob("*.py")})
    code = (
        "import importlib.util, json, sys;"
        "print(json.dumps([n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None]))"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code, *stems], cwd="/", capture_output=True, text=True
    )
    assert json.loads(out.stdout) == [], "bench/ or tools/ files named like installed modules"
