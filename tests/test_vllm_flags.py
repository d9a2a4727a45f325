"""vLLM flags on `splitserve serve` and the service subcommands: the pinned-value table and
`--config FILE.yaml`."""

from __future__ import annotations

import json

import pytest

from splitserve.cli import build_parser, main
from splitserve.vllm_compat import PINNED

# A value each row accepts and one it refuses (None: the row accepts nothing).
_VALUES = {
    "--tensor-parallel-size": ("1", "2"),
    "--data-parallel-size": ("1", "4"),
    "--quantization": (None, "awq"),
    "--kv-cache-dtype": ("auto", "fp8"),
    "--distributed-executor-backend": ("mp", "ray"),
    "--preemption-mode": ("recompute", "swap"),
    "--logprobs-mode": ("raw_logprobs", "processed_logprobs"),
    "--task": ("generate", "embed"),
    "--model-impl": ("vllm", "transformers"),
    "--cpu-offload-gb": ("0", "8"),
    "--swap-space": ("4", "16"),
    "--num-scheduler-steps": ("1", "8"),
    "--lora-dtype": ("auto", "bfloat16"),
    "--fully-sharded-loras": (False, True),
    "--enable-expert-parallel": (False, True),
    "--enable-eplb": (False, True),
    "--compilation-config": ('{"level": 0}', '{"level": 3}'),
    "--max-num-partial-prefills": ("1", "4"),
    "--long-prefill-token-threshold": ("0", "512"),
    "--tokenizer-pool-size": ("0", "4"),
    "--disable-frontend-multiprocessing": (False, True),
    "--middleware": (None, "my.module.Middleware"),
}


def _argv(row, value) -> list[str]:
    if row.boolean:
        return [row.flag if value else "--no-" + row.flag[2:]]
    return [row.flag, value]


def test_table_covers_the_rows():
    assert {row.flag for row in PINNED} == set(_VALUES)


@pytest.mark.parametrize("row", PINNED, ids=lambda r: r.flag)
def test_pinned_flag(row, capsys):
    good, bad = _VALUES[row.flag]
    if good is not None:
        assert main(["serve", *_argv(row, good), "--check-config"]) == 0
        # The service subcommands that own the flag take it too.
        for service in sorted(row.services):
            pre = ["m"] if service == "worker" else []
            extra = ["--tokenizer", "t"] if service == "tokenizer" else []
            assert main([service, *pre, *_argv(row, good), *extra, "--check-config"]) == 0
    capsys.readouterr()
    assert main(["serve", *_argv(row, bad), "--check-config"]) == 2
    err = capsys.readouterr().err
    shown = row.flag if not row.boolean or bad else "--no-" + row.flag[2:]
    assert shown in err and row.instead.split(";")[0] in err, err
    if not row.boolean:
        assert str(bad) in err


def test_pinned_flags_in_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "vLLM flags with one supported value" in out
    assert "splitserve has no tensor parallelism" in out
    assert "-tp VALUE" in out and "-O VALUE" in out


def test_short_aliases(capsys):
    assert main(["serve", "-tp", "1", "-O0", "--swap-space", "4.0", "--check-config"]) == 0
    capsys.readouterr()
    assert main(["serve", "-O3", "--check-config"]) == 2
    assert "torch.compile" in capsys.readouterr().err


def test_flag_of_another_service_is_unknown(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "--tokenizer", "t", "--tensor-parallel-size", "1", "--check-config"])
    assert exc.value.code == 2


def _checked(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_config_file(tmp_path, capsys):
    path = tmp_path / "vllm.yaml"
    path.write_text(
        "model: /models/x\n"
        "max_model_len: 1024\n"
        "enable-prefix-caching: false\n"
        "served-model-name: [a, b]\n"
        "override_generation_config: {temperature: 0.5}\n"
        "tensor-parallel-size: 1\n"
    )
    out = _checked(["serve", "--config", str(path), "--check-config"], capsys)
    assert out["worker"]["model"] == "/models/x"
    assert out["scheduler"]["max_model_len"] == 1024
    assert out["scheduler"]["enable_prefix_caching"] is False
    assert out["gateway"]["served_model_name"] == ["a", "b"]
    assert json.loads(out["worker"]["override_generation_config"]) == {"temperature": 0.5}
    # The command line wins over the file, the model included.
    out = _checked(
        ["serve", "/models/y", "--max-model-len", "512", "--config", str(path), "--check-config"],
        capsys,
    )
    assert out["worker"]["model"] == "/models/y"
    assert out["scheduler"]["max_model_len"] == 512
    assert out["scheduler"]["enable_prefix_caching"] is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no_such_flag: 1\n", "'no_such_flag' is not a flag of `serve`"),
        ("enable-prefix-caching: 3\n", "is a switch"),
        ("- a\n- b\n", "must hold a mapping"),
        ("tensor-parallel-size: 2\n", "--tensor-parallel-size 2"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_config_file_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    try:
        code = main(["serve", "--config", str(path), "--check-config"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_config_file_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", str(tmp_path / "none.yaml"), "--check-config"])
    assert exc.value.code == 2
    assert "cannot be read" in capsys.readouterr().err
