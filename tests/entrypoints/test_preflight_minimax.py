"""`splitserve serve` refuses a MiniMax checkpoint the lightning / MoE layers cannot serve
before it starts any process (exit 2), naming the config field; a good one passes."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from splitserve.entrypoints import cli, launcher
from splitserve.testing.minimax_model import build_minimax


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    return build_minimax(tmp_path_factory.mktemp("preflight-minimax") / "m", vocab_size=300)


@pytest.fixture(scope="module")
def minimax_vl(minimax, tmp_path_factory):
    from tests.models.minimax_vl_utils import build_minimax_vl

    return build_minimax_vl(tmp_path_factory.mktemp("preflight-minimax-vl") / "vl", minimax)


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
        ({"hidden_act": "relu"}, r"unsupported hidden_act 'relu' for lightning attention"),
        (
            {"layer_types": ["linear_attention", "sliding_attention", "linear_attention"]},
            r"unsupported MiniMax layer type\(s\) \['sliding_attention'\]",
        ),
        ({"sliding_window": 64}, r"sliding_window 64 is not supported for MiniMax"),
    ],
)
def test_unsupported_minimax_config_is_a_startup_error(
    minimax, tmp_path, spawned, capsys, edit, message
):
    folder = tmp_path / "bad"
    shutil.copytree(minimax, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    code = cli.main(["serve", str(folder), "--max-model-len", "256"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert spawned == []
    assert re.search(message, err), err


def test_a_good_minimax_passes_preflight(minimax, monkeypatch):
    started: list[str] = []

    class Started(Exception):
        pass

    def spawn(self, name, argv, env=None):
        started.append(name)
        raise Started(name)

    monkeypatch.setattr(launcher.Stack, "spawn", spawn)
    with pytest.raises(Started):
        cli.main(["serve", str(minimax), "--max-model-len", "256"])
    assert started


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            {"vision_feature_select_strategy": "full"},
            r"unsupported vision_feature_select_strategy 'full' for MiniMax-VL-01",
        ),
        ({"image_grid_pinpoints": [[24, 40]]}, r"not multiples of the tile size 24"),
        ({"text_config": {"hidden_act": "relu"}}, r"unsupported hidden_act 'relu'"),
    ],
)
def test_unsupported_minimax_vl_config_is_a_startup_error(
    minimax_vl, tmp_path, spawned, capsys, edit, message
):
    folder = tmp_path / "bad"
    shutil.copytree(minimax_vl, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    code = cli.main(["serve", str(folder), "--max-model-len", "256"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert spawned == []
    assert re.search(message, err), err
