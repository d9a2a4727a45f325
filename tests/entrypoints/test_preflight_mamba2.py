"""`splitserve serve` refuses a state-space checkpoint the Mamba2 mixer cannot serve before it
starts any process (exit 2), naming the config field."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from splitserve.entrypoints import cli, launcher
from splitserve.testing.mamba2_model import build_mamba2


@pytest.fixture(scope="module")
def mamba2(tmp_path_factory):
    return build_mamba2(tmp_path_factory.mktemp("preflight-ssm") / "m", num_layers=1)


@pytest.fixture
def spawned(monkeypatch):
    calls: list[str] = []

    def spawn(self, name, argv, env=None):
        calls.append(name)
        raise AssertionError(f"the launcher started {name} for a bad model")

    monkeypatch.setattr(launcher.Stack, "spawn", spawn)
    return calls


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"hidden_act": "relu"}, r"unsupported hidden_act 'relu' .*supported: silu, swish"),
        ({"n_groups": 3}, r"num_heads \(8\) must be a multiple of n_groups \(3\)"),
    ],
)
def test_unsupported_mixer_config_is_a_startup_error(
    mamba2, tmp_path, spawned, capsys, edit, message
):
    folder = tmp_path / "bad"
    shutil.copytree(mamba2, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    code = cli.main(["serve", str(folder), "--max-model-len", "256"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert spawned == []
    assert "splitserve serve: error:" in err
    assert re.search(message, err), err


def test_a_good_mamba2_passes_preflight(mamba2, monkeypatch):
    started: list[str] = []

    class Started(Exception):
        pass

    def spawn(self, name, argv, env=None):
        started.append(name)
        raise Started(name)

    monkeypatch.setattr(launcher.Stack, "spawn", spawn)
    with pytest.raises(Started):
        cli.main(["serve", str(mamba2)])
    assert started


def test_tensor_parallelism_of_an_architecture_without_it_is_a_startup_error(
    mamba2, spawned, capsys
):
    code = cli.main(["serve", str(mamba2), "--max-model-len", "256", "-tp", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert spawned == []
    assert "Mamba2ForCausalLM does not support tensor parallelism" in err, err
    assert "--tensor-parallel-size 2" in err
