"""--runner / --convert / --pooler-config parsing and the sentence-transformers defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest

from splitserve.common.pooling import (
    check_runner,
    dimensions_problem,
    finish_embedding,
    parse_pooler_config,
    read_sentence_transformers_pooling,
    resolve_pooler,
    resolve_runner,
)
from splitserve.worker.config import WorkerConfig


def test_runner_resolution():
    assert resolve_runner("auto", "auto") == "generate"
    assert resolve_runner("pooling", "auto") == "pooling"
    assert resolve_runner("auto", "embed") == "pooling"
    with pytest.raises(ValueError, match="needs --runner pooling"):
        resolve_runner("generate", "embed")
    # A bare decoder (saved from AutoModel, as e5-mistral) is an embedding model under auto.
    assert resolve_runner("auto", "auto", ["MistralModel"]) == "pooling"
    assert resolve_runner("auto", "auto", ["MistralForCausalLM"]) == "generate"
    with pytest.raises(ValueError, match="architecture Qwen3Model makes a pooling model"):
        resolve_runner("generate", "auto", ["Qwen3Model"])
    # Pooler flags under auto are checked once the architecture is known.
    cfg = WorkerConfig(model="m", pooler_config='{"normalize": false}')
    assert check_runner(cfg, ["Qwen3Model"]) == "pooling"
    with pytest.raises(ValueError, match="pooler_config needs --runner pooling"):
        check_runner(cfg, ["Qwen3ForCausalLM"])


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(runner="draft"), "runner must be one of"),
        (dict(convert="classify"), "convert must be one of"),
        (dict(runner="pooling", pooler_config="{"), "not valid JSON"),
        (dict(runner="pooling", pooler_config="[1]"), "must be a JSON object"),
        (dict(runner="pooling", pooler_config='{"pooling_type": "ALL"}'), "LAST, MEAN, CLS"),
        (dict(runner="pooling", pooler_config='{"normalize": "yes"}'), "true or false"),
        (dict(runner="pooling", pooler_config='{"softmax": true}'), "unsupported key"),
        (dict(runner="generate", pooler_config='{"normalize": false}'), "needs --runner pooling"),
        (dict(runner="pooling", override_pooler_config='{"x": 1}'), "override_pooler_config"),
    ],
)
def test_bad_flags(kw, needle):
    with pytest.raises(ValueError, match=needle):
        WorkerConfig(model="m", **kw)


def test_pooler_config_parsing():
    assert parse_pooler_config('{"pooling_type": "mean", "normalize": false}') == {
        "pooling_type": "MEAN",
        "normalize": False,
    }
    assert parse_pooler_config(None) == {}
    # The in-process LLM takes a dict, carried on as JSON.
    cfg = WorkerConfig(model="m", runner="pooling", pooler_config={"pooling_type": "CLS"})
    assert json.loads(cfg.pooler_config) == {"pooling_type": "CLS"}


def _st_folder(tmp_path, pooling: dict, normalize: bool):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return tmp_path


def test_sentence_transformers_defaults_and_overrides(tmp_path):
    assert resolve_pooler(tmp_path, None, None).pooling_type == "LAST"  # no modules.json
    assert resolve_pooler(tmp_path, None, None).normalize
    folder = _st_folder(tmp_path, {"pooling_mode_mean_tokens": True}, normalize=False)
    assert read_sentence_transformers_pooling(folder) == {
        "pooling_type": "MEAN",
        "normalize": False,
    }
    settings = resolve_pooler(folder, None, '{"normalize": true}')
    assert (settings.pooling_type, settings.normalize) == ("MEAN", True)
    # --pooler-config wins over the older --override-pooler-config, key by key.
    settings = resolve_pooler(folder, '{"pooling_type": "CLS"}', '{"pooling_type": "LAST"}')
    assert (settings.pooling_type, settings.normalize) == ("CLS", False)


def test_sentence_transformers_unsupported_mode(tmp_path):
    folder = _st_folder(tmp_path, {"pooling_mode_max_tokens": True}, normalize=True)
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        resolve_pooler(folder, None, None)
    # ...unless the flag says how to pool.
    assert resolve_pooler(folder, '{"pooling_type": "MEAN"}', None).pooling_type == "MEAN"


def test_truncate_then_normalize():
    vec = np.array([3.0, 4.0, 12.0], dtype=np.float32)
    assert finish_embedding(vec, 2, True).tolist() == pytest.approx([0.6, 0.8])
    assert finish_embedding(vec, None, False).tolist() == [3.0, 4.0, 12.0]
    assert finish_embedding(vec, None, True).tolist() == pytest.approx([3 / 13, 4 / 13, 12 / 13])


def test_dimensions_rules():
    assert "does not support matryoshka" in dimensions_problem(4, "M", False, [], 8)
    assert dimensions_problem(4, "M", True, [], 8) is None
    assert "only supports [4, 8]" in dimensions_problem(5, "M", True, [4, 8], 8)
    assert "at least 1" in dimensions_problem(0, "M", True, [], 8)
    assert "hidden size" in dimensions_problem(9, "M", True, [], 8)


def test_sentence_transformers_modules_that_would_change_the_vector_are_refused(tmp_path):
    folder = _st_folder(tmp_path, {"pooling_mode_lasttoken": True}, normalize=True)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append(
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        resolve_pooler(folder, None, None)


def test_sentence_transformers_include_prompt_false_is_refused(tmp_path):
    folder = _st_folder(
        tmp_path, {"pooling_mode_mean_tokens": True, "include_prompt": False}, normalize=True
    )
    with pytest.raises(ValueError, match="include_prompt"):
        resolve_pooler(folder, None, None)
