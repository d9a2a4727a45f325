"""`splitserve serve` refuses a Qwen3-Next checkpoint the gated delta net cannot serve before
it starts any process (exit 2), naming the config field; a good one passes."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from splitserve.entrypoints import cli, launcher
from splitserve.testing.qwen3_next_model import build_qwen3_next


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    return build_qwen3_next(
        tmp_path_factory.mktemp("preflight-gdn") / "m",
        layer_types=("linear_attention", "full_attention"),
    )


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
        ({"hidden_act": "gelu"}, r"unsupported hidden_act 'gelu' .*supported: silu, swish"),
        (
            {"linear_num_value_heads": 3},
            r"linear_num_value_heads \(3\) must be a multiple of linear_num_key_heads \(2\)",
        ),
        (
            {"layer_types": ["linear_attention", "sliding_attention"]},
            r"layer_types\[1\] is 'sliding_attention'; supported: linear_attention, full_attention",
        ),
    ],
)
def test_unsupported_config_is_a_startup_error(
    qwen3_next, tmp_path, spawned, capsys, edit, message
):
    folder = tmp_path / "bad"
    shutil.copytree(qwen3_next, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    code = cli.main(["serve", str(folder), "--max-model-len", "256"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert spawned == []
    assert "splitserve serve: error:" in err
    assert re.search(message, err), err


def test_a_good_qwen3_next_passes_preflight(qwen3_next, monkeypatch):
    started: list[str] = []

    class Started(Exception):
        pass

    def spawn(self, name, argv, env=None):
        started.append(name)
        raise Started(name)

    monkeypatch.setattr(launcher.Stack, "spawn", spawn)
    with pytest.raises(Started):
        cli.main(["serve", str(qwen3_next), "--max-model-len", "256"])
    assert started
