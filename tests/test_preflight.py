"""`splitserve serve` refuses a model that cannot load before it starts any process."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from splitserve import cli, launcher
from splitserve.demo_model import build_model


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return build_model(
        tmp_path_factory.mktemp("preflight") / "tiny",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        max_position_embeddings=128,
    )


class Spawned(Exception):
    """Raised by the patched Stack.spawn: the launcher got past its checks."""


@pytest.fixture
def spawned(monkeypatch):
    """argv of every process the launcher starts (the first start ends the run)."""
    calls: list[tuple[str, list[str]]] = []

    def spawn(self, name, argv, env=None):
        calls.append((name, argv))
        raise Spawned(name)

    monkeypatch.setattr(launcher.Stack, "spawn", spawn)
    return calls


def _copy(src, dst, edit_config=None):
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _bad_arch(c):
    c["architectures"] = ["GPT2LMHeadModel"]


def _remote(c):
    c["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    c["model_type"] = "x-custom"


def _bad_shape(folder):
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:60]
    save_file(state, folder / "model.safetensors")


@pytest.mark.parametrize(
    "case,flags,message",
    [
        ("absent", [], "does not exist"),
        ("arch", [], r"unsupported model architecture \['GPT2LMHeadModel'\]; supported: Llama"),
        ("remote", [], r"needs remote code .*--trust-remote-code"),
        (
            "shape",
            [],
            r"up_proj\.weight: shard 'up' weight has shape \(60, 32\), expected \(64, 32\)",
        ),
        ("noweights", [], r"no weight files in"),
        ("good", ["--max-model-len", "4096"], r"--max-model-len 4096 is longer .*=128"),
        ("good", ["--tokenizer", "/no/such/tokenizer"], r"/no/such/tokenizer"),
        ("good", ["--pipeline-parallel-size", "3"], r"pipeline"),
    ],
)
def test_bad_model_fails_before_any_process(
    case, flags, message, good_model, tmp_path, spawned, capsys
):
    folder = {
        "absent": lambda: tmp_path / "absent",
        "arch": lambda: _copy(good_model, tmp_path / "m", _bad_arch),
        "remote": lambda: _copy(good_model, tmp_path / "m", _remote),
        "shape": lambda: _copy(good_model, tmp_path / "m"),
        "noweights": lambda: _copy(good_model, tmp_path / "m"),
        "good": lambda: good_model,
    }[case]()
    if case == "shape":
        _bad_shape(folder)
    if case == "noweights":
        (folder / "model.safetensors").unlink()
    code = cli.main(["serve", str(folder), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert spawned == []
    assert "splitserve serve: error:" in err
    assert re.search(message, err), err


def test_mistral_tokenizer_mode_without_the_package(good_model, spawned, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # as if not installed
    code = cli.main(["serve", str(good_model), "--tokenizer-mode", "mistral"])
    err = capsys.readouterr().err
    assert code == 2 and spawned == []
    assert "tokenizer_mode 'mistral' needs the mistral_common package" in err
    assert "pip install mistral-common" in err


def test_good_model_passes_and_hub_options_reach_the_processes(good_model, spawned, monkeypatch):
    # Record every start instead of stopping at the first one.
    def spawn(self, name, argv, env=None):
        spawned.append((name, argv))

    monkeypatch.setattr(launcher.Stack, "spawn", spawn)
    monkeypatch.setattr(launcher, "_healthy", lambda url: True)
    monkeypatch.setattr(launcher.Stack, "dead", lambda self: ("test", 0))
    flags = [
        "--revision",
        "r1",
        "--tokenizer-revision",
        "t1",
        "--code-revision",
        "c1",
        "--download-dir",
        "/dl",
        "--trust-remote-code",
        "--max-parallel-loading-workers",
        "3",
        "--load-format",
        "safetensors",
    ]
    assert cli.main(["serve", str(good_model), *flags]) == 1  # our fake "dead" child
    argv = dict(spawned)
    worker = " ".join(argv["worker0"])
    for flag in (
        "--revision r1",
        "--code-revision c1",
        "--download-dir /dl",
        "--trust-remote-code",
        "--max-parallel-loading-workers 3",
        "--load-format safetensors",
    ):
        assert flag in worker, worker
    tokenizer = " ".join(argv["tokenizer"])
    for flag in ("--revision r1", "--tokenizer-revision t1", "--download-dir /dl"):
        assert flag in tokenizer, tokenizer


def test_serve_with_a_bad_model_exits_nonzero_and_opens_no_port(good_model, tmp_path):
    folder = _copy(good_model, tmp_path / "m", _bad_arch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "--log-level", "debug", "serve", str(folder)]
        + ["--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "splitserve serve: error: unsupported model architecture" in proc.stderr
    assert re.search(r"supported: LlamaForCausalLM, (\w+, )*Qwen2ForCausalLM", proc.stderr)
    assert "starting " not in proc.stderr  # Stack.spawn logs each start at debug level
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
