"""vLLM flags on `splitserve serve` and the service subcommands: the pinned-value table and
`--config FILE.yaml`."""

from __future__ import annotations

import json

import pytest

from splitserve.entrypoints.cli import build_parser, dotted_json_flags, main
from splitserve.entrypoints.vllm_compat import PINNED

# A value each row accepts and one it refuses (None: the row accepts nothing).
_VALUES = {
    "--data-parallel-size": ("1", "4"),
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
    "--expert-placement-strategy": ("linear", "round_robin"),
    "--all2all-backend": ("allgather_reducescatter", "deepep_low_latency"),
    "--compilation-config": ('{"level": 0}', '{"level": 3}'),
    "--max-num-partial-prefills": ("1", "4"),
    "--long-prefill-token-threshold": ("0", "512"),
    "--tokenizer-pool-size": ("0", "4"),
    "--disable-frontend-multiprocessing": (False, True),
    "--middleware": (None, "my.module.Middleware"),
    "--speculative-config": (None, '{"method": "ngram", "num_speculative_tokens": 3}'),
    "--kv-transfer-config": (None, '{"kv_connector": "NixlConnector"}'),
    "--kv-events-config": (None, '{"enable_kv_cache_events": true}'),
    "--kv-offloading-size": (None, "8"),
    "--prefix-caching-hash-algo": ("sha256", "xxhash"),
    "--enable-sleep-mode": (False, True),
    "--calculate-kv-scales": (False, True),
    "--disable-custom-all-reduce": (True, None),
    "--disable-cascade-attn": (True, None),
    "--decode-context-parallel-size": ("1", "2"),
    "--optimization-level": ("0", "3"),
    "--logits-processors": (None, "my.module.Processor"),
    "--worker-extension-cls": (None, "my.module.Extension"),
    "--scheduler-cls": (None, "my.module.Scheduler"),
    "--max-long-partial-prefills": ("1", "2"),
    "--data-parallel-rank": (None, "1"),
    "--data-parallel-size-local": (None, "2"),
    "--data-parallel-address": (None, "10.0.0.1"),
    "--data-parallel-rpc-port": (None, "13345"),
    "--data-parallel-backend": ("mp", "ray"),
    "--nnodes": ("1", "2"),
    "--node-rank": ("0", "1"),
    "--headless": (False, True),
    "--api-server-count": ("1", "4"),
    "--uds": (None, "/tmp/vllm.sock"),
    "--grpc": (False, True),
    "--stream-interval": ("1", "8"),
    "--tool-parser-plugin": ("", "/plugins/parser.py"),
    "--reasoning-parser-plugin": ("", "/plugins/reasoning.py"),
    "--tool-server": (None, "demo"),
    "--enable-force-include-usage": (False, True),
    "--enable-log-outputs": (False, True),
    "--enable-tokenizer-info-endpoint": (False, True),
    "--enable-prompt-embeds": (False, True),
    "--skip-tokenizer-init": (False, True),
    "--hf-token": (None, "hf_abc"),
    "--log-config-file": (None, "/etc/logging.json"),
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
    if bad is None:  # both values describe splitserve
        assert main(["serve", *_argv(row, not good), "--check-config"]) == 0
        return
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
    assert "splitserve preempts by recompute and never swaps" in out
    assert "--enable-eplb" in out and "--eplb-config EPLB_CONFIG" in out  # real flags now
    assert "-tp TENSOR_PARALLEL_SIZE" in out and "-O VALUE" in out


def test_short_aliases(capsys):
    assert main(["serve", "-tp", "1", "-O0", "--swap-space", "4.0", "--check-config"]) == 0
    capsys.readouterr()
    assert main(["serve", "-O3", "--check-config"]) == 2
    assert "torch.compile" in capsys.readouterr().err


def test_vllm_spellings_of_flags(capsys):
    # vLLM's --model, underscores in flag names, and its short aliases.
    out = _checked(
        [
            "serve",
            "--model",
            "/models/x",
            "--max_num_seqs=7",
            "--max_model_len",
            "640",
            "-pp",
            "2",
            "-ep",
            "--no-enable-expert-parallel",
            "--check-config",
        ],
        capsys,
    )
    assert out["worker"]["model"] == "/models/x"
    assert out["scheduler"]["max_num_seqs"] == 7
    assert out["scheduler"]["max_model_len"] == 640
    assert out["worker"]["pipeline_parallel_size"] == 2
    out = _checked(["worker", "--model", "/models/x", "--check-config"], capsys)
    assert out["worker"]["model"] == "/models/x"
    # A list flag as one JSON list; --shutdown-timeout is the drain timeout.
    out = _checked(
        [
            "serve",
            "m",
            "--allowed-origins",
            '["https://a", "https://b"]',
            "--shutdown-timeout",
            "5",
            "--check-config",
        ],
        capsys,
    )
    assert out["gateway"]["allowed_origins"] == ["https://a", "https://b"]
    assert out["gateway"]["drain_timeout_s"] == 5.0
    # A value with underscores stays as it is.
    out = _checked(["serve", "m", "--served-model-name", "my_model", "--check-config"], capsys)
    assert out["gateway"]["served_model_name"] == ["my_model"]


def test_dotted_keys_of_json_flags(capsys):
    """vLLM's `--json-flag.key value` form: keys merged into one object (over the flag's whole
    JSON, dotted keys winning), nested keys, `=`, lists with `+`, underscores kept in keys."""
    out = _checked(
        [
            "serve",
            "m",
            "-tp",
            "2",
            "--enable-expert-parallel",
            "--enable-eplb",
            "--eplb-config",
            '{"window_size": 7, "step_interval": 9}',
            "--eplb-config.step_interval=4",
            "--eplb_config.num_redundant_experts",
            "2",
            "--hf-overrides.rope_scaling.factor",
            "2.0",
            "--hf-overrides.rope_scaling.rope_type",
            "linear",
            "--override-generation-config.temperature",
            "0.5",
            "--check-config",
        ],
        capsys,
    )
    worker = out["worker"]
    assert json.loads(worker["eplb_config"]) == {
        "window_size": 7,
        "step_interval": 4,
        "num_redundant_experts": 2,
    }
    assert json.loads(worker["hf_overrides"]) == {"rope_scaling": {"factor": 2.0, "rope_type": "linear"}}  # fmt: skip
    assert json.loads(worker["override_generation_config"]) == {"temperature": 0.5}
    assert dotted_json_flags(["--x.tags+", "a,b", "--x.n=1"]) == ["--x", '{"tags": ["a", "b"], "n": 1}']  # fmt: skip
    assert dotted_json_flags(["m", "--served-model-name", "my.model"]) == ["m", "--served-model-name", "my.model"]  # fmt: skip
    assert main(["serve", "m", "--eplb-config.windows", "3", "--check-config"]) == 2
    assert "unknown eplb_config key 'windows'" in capsys.readouterr().err


def test_model_twice_or_missing_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "/models/a", "--model", "/models/b", "--check-config"])
    assert exc.value.code == 2
    assert "/models/a" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["worker", "--check-config"])
    assert "a model is required" in capsys.readouterr().err


def test_no_prefix_of_a_flag_is_taken_for_the_flag(capsys):
    # argparse's abbreviations would read `--max-num-seq 4` as --max-num-seqs (and vLLM's
    # `--model X`, before splitserve took --model, as --model-impl X).
    for argv in (["--max-num-seq", "4"], ["--enable-prefix"]):
        with pytest.raises(SystemExit) as exc:
            main(["serve", "m", *argv, "--check-config"])
        assert exc.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


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
        ("data-parallel-size: 2\n", "--data-parallel-size 2"),
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


def test_tensor_parallel_rows_say_what_splitserve_does(capsys):
    """Tensor parallelism exists: no row may say otherwise, and --fully-sharded-loras's reason
    (LoRA is refused under tensor parallelism) is what the config really does."""
    assert not [r.flag for r in PINNED if "no tensor parallelism" in r.instead]
    assert main(["serve", "--fully-sharded-loras", "--check-config"]) == 2
    assert "LoRA is refused under tensor parallelism" in capsys.readouterr().err
    assert main(["serve", "--enable-lora", "-tp", "2", "--check-config"]) == 2
    assert "--enable-lora with --tensor-parallel-size 2" in capsys.readouterr().err
    assert main(["serve", "--enable-lora", "--check-config"]) == 0
