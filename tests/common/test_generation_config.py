"""--generation-config / --override-generation-config: which defaults a model folder gives, how
an override merges, and the start-up refusals (bad JSON, unknown keys, wrong types, a folder
without generation_config.json, a bad value in the file)."""

from __future__ import annotations

import json
import math

import pytest

from splitserve.common.generation_config import (
    SamplingDefaults,
    check_mode,
    parse_override,
    resolve,
)
from splitserve.entrypoints import cli
from splitserve.worker.config import WorkerConfig

QWEN_LIKE = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "max_new_tokens": 64,
    "transformers_version": "4.37.0",
}


def _folder(tmp_path, name: str, content: dict | str):
    folder = tmp_path / name
    folder.mkdir()
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / "generation_config.json").write_text(text)
    return folder


def test_auto_reads_the_sampling_keys_of_the_model_folder(tmp_path):
    model = _folder(tmp_path, "model", QWEN_LIKE)
    d = resolve("auto", model, None)
    assert d == SamplingDefaults(
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, max_tokens=64
    )
    # Everything differs from splitserve's own defaults, so all are named in the warning.
    assert d.changed() == d.as_dict()


def test_vllm_mode_ignores_the_file_but_still_takes_the_override(tmp_path):
    model = _folder(tmp_path, "model", QWEN_LIKE)
    assert resolve("vllm", model, None) == SamplingDefaults()
    assert resolve("vllm", model, '{"temperature": 0.5}') == SamplingDefaults(temperature=0.5)


def test_override_merges_over_the_file_and_null_drops_a_key(tmp_path):
    model = _folder(tmp_path, "model", QWEN_LIKE)
    d = resolve("auto", model, {"temperature": 0.2, "min_p": 0.05, "top_k": None})
    assert d == SamplingDefaults(
        temperature=0.2, top_p=0.8, min_p=0.05, repetition_penalty=1.05, max_tokens=64
    )


def test_a_folder_flag_reads_that_folder_instead_of_the_model(tmp_path):
    model = _folder(tmp_path, "model", QWEN_LIKE)
    other = _folder(tmp_path, "other", {"temperature": 0.3})
    assert resolve(str(other), model, None) == SamplingDefaults(temperature=0.3)


def test_no_file_and_transformers_defaults_give_no_defaults(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    assert resolve("auto", bare, None) == SamplingDefaults()
    # As vLLM (transformers' to_diff_dict): values equal to GenerationConfig's own defaults are
    # not taken, do_sample is not read; an override of the same value is taken.
    model = _folder(
        tmp_path,
        "hf_defaults",
        {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "do_sample": False, "min_p": 0.1},
    )
    assert resolve("auto", model, None) == SamplingDefaults(min_p=0.1)
    assert resolve("auto", model, '{"top_k": 50}') == SamplingDefaults(top_k=50, min_p=0.1)


def test_changed_leaves_out_values_equal_to_splitserves_own():
    d = SamplingDefaults(temperature=1.0, top_k=-1, top_p=0.9)
    assert d.changed() == {"top_p": 0.9}


def test_proto_round_trip_keeps_presence_and_double_precision():
    d = SamplingDefaults(temperature=0.7, top_k=0, max_tokens=32)
    proto = d.to_proto()
    assert proto.HasField("top_k") and not proto.HasField("top_p")
    assert SamplingDefaults.from_proto(proto) == d
    assert SamplingDefaults.from_proto(type(proto)()) == SamplingDefaults()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{temperature: 0.5}", "not valid JSON"),
        ("[0.5]", "must be a JSON object, got list"),
        ('{"temprature": 0.5}', "unknown key(s) ['temprature']"),
        ('{"max_tokens": 5}', "calls it max_new_tokens"),
        ('{"temperature": "0.5"}', "temperature must be a number, got str '0.5'"),
        ('{"top_k": true}', "top_k must be a number, got bool"),
        ('{"top_k": 2.5}', "top_k must be an integer, got 2.5"),
        ('{"temperature": -1}', "temperature must be a finite number >= 0, got -1.0"),
        ('{"top_p": 0}', "top_p must be in (0, 1], got 0.0"),
        ('{"max_new_tokens": 0}', "max_new_tokens must be at least 1, got 0"),
        ('{"repetition_penalty": NaN}', "repetition_penalty must be a finite number > 0"),
    ],
)
def test_bad_override_is_refused_by_name(text, needle):
    with pytest.raises(ValueError) as err:
        parse_override(text)
    assert needle in str(err.value)
    with pytest.raises(ValueError):
        WorkerConfig(model="m", override_generation_config=text)


def test_override_dict_becomes_the_json_a_child_process_gets():
    cfg = WorkerConfig(model="m", override_generation_config={"temperature": 0.5, "top_k": 3})
    assert json.loads(cfg.override_generation_config) == {"temperature": 0.5, "top_k": 3}


def test_mode_must_be_auto_vllm_or_a_folder_with_the_file(tmp_path):
    check_mode("auto")
    check_mode("vllm")
    with pytest.raises(ValueError, match="no such folder"):
        check_mode(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no generation_config.json"):
        check_mode(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "is not valid JSON"),
        ('{"temperature": -0.5}', "temperature must be a finite number >= 0, got -0.5"),
        ('{"top_k": "20"}', "top_k must be a number, got str"),
    ],
)
def test_bad_file_is_refused_naming_the_file(tmp_path, content, needle):
    model = _folder(tmp_path, "model", content)
    with pytest.raises(ValueError) as err:
        resolve("auto", model, None)
    assert needle in str(err.value) and str(model / "generation_config.json") in str(err.value)


# ---------------------------------------------------------------------- the command line


def test_flags_reach_the_worker_config_of_serve_and_worker(tmp_path, capsys):
    folder = _folder(tmp_path, "gen", {"temperature": 0.4})
    argv = ["--generation-config", str(folder), "--override-generation-config", '{"top_k": 7}']
    assert cli.main(["serve", "m", "--check-config", *argv]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["worker"]["generation_config"] == str(folder)
    assert json.loads(out["worker"]["override_generation_config"]) == {"top_k": 7}
    assert cli.main(["worker", "m", "--check-config", *argv]) == 0
    assert json.loads(capsys.readouterr().out)["worker"]["generation_config"] == str(folder)


@pytest.mark.parametrize("command", [["serve", "m"], ["worker", "m"]])
@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--override-generation-config", '{"temperature": 0.5'], "not valid JSON"),
        (["--override-generation-config", '{"seed": 1}'], "unknown key(s) ['seed']"),
        (["--override-generation-config", '{"top_p": "high"}'], "top_p must be a number"),
        (["--generation-config", "/nonexistent/folder"], "no such folder"),
    ],
)
def test_bad_flags_exit_2_with_the_reason(command, flags, needle, capsys):
    assert cli.main([*command, "--check-config", *flags]) == 2
    assert needle in capsys.readouterr().err


def test_the_gateway_does_not_take_the_flags(capsys):
    # The defaults reach the gateway from the worker over gRPC (ModelInfo), not by flag.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["gateway", "--check-config", "--generation-config", "vllm"])
    assert exit_.value.code == 2


def test_finite_checks_cover_json_infinity():
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        parse_override('{"temperature": Infinity}')
    assert math.isfinite(parse_override('{"temperature": 1e3}')["temperature"])
