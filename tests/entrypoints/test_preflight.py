"""`splitserve serve` refuses a model that cannot load before it starts any process."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.entrypoints import cli, launcher
from splitserve.testing.demo_model import build_model
from splitserve.worker.models.registry import MODEL_REGISTRY


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


def _gptq(c):
    c["quantization_config"] = {"quant_method": "gptq", "bits": 4}


def _bad_shape(folder):
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:60]
    save_file(state, folder / "model.safetensors")


@pytest.mark.parametrize(
    "case,flags,message",
    [
        ("absent", [], "does not exist"),
        (
            "arch",
            [],
            r"unsupported model architecture \['GPT2LMHeadModel'\]; supported: Bamba.*, Llama",
        ),
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
        (
            "quant",
            [],
            r"quant_method 'gptq', which splitserve does not load; supported: fp8, fbgemm_fp8, "
            r"compressed-tensors, awq, mxfp4",
        ),
        ("good", ["--quantization", "fbgemm_fp8"], r"needs a checkpoint saved in that format"),
        ("good", ["--quantization", "mxfp4"], r"--quantization mxfp4 needs a checkpoint saved"),
        (
            "good",
            ["--quantization", "gptq"],
            r"quantization must be one of fp8, fbgemm_fp8, compressed-tensors, awq, mxfp4",
        ),
        ("good", ["--quantization", "awq"], r"--quantization awq needs a checkpoint saved in"),
    ],
)
def test_bad_model_fails_before_any_process(
    case, flags, message, good_model, tmp_path, spawned, capsys
):
    folder = {
        "absent": lambda: tmp_path / "absent",
        "arch": lambda: _copy(good_model, tmp_path / "m", _bad_arch),
        "quant": lambda: _copy(good_model, tmp_path / "m", _gptq),
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


def _int4_edit(fmt, config_edit=None, tensor=None, shape=None):
    def edit(folder):
        if config_edit:
            config = json.loads((folder / "config.json").read_text())
            config_edit(config["quantization_config"])
            (folder / "config.json").write_text(json.dumps(config))
        if tensor:
            state = load_file(folder / "model.safetensors")
            state[tensor] = torch.ones(shape, dtype=state[tensor].dtype)
            save_file(state, folder / "model.safetensors")

    return fmt, edit


INT4_BAD = {
    "awq-group": (
        _int4_edit("awq", lambda q: q.update(group_size=24)),
        r"layer model\.layers\.0\.self_attn\.qkv_proj: group_size 24 does not divide the "
        r"input dim 32",
    ),
    "awq-bits": (
        _int4_edit("awq", lambda q: q.update(bits=3)),
        r"quantization_config\.bits 3: AWQ checkpoints of 4 bits only are supported",
    ),
    "awq-scales": (
        _int4_edit("awq", tensor="model.layers.1.self_attn.v_proj.scales", shape=(2, 16)),
        r"checkpoint tensor model\.layers\.1\.self_attn\.v_proj\.scales: shard 'v' scales "
        r"has shape \(2, 16\), expected \(1, 16\)",
    ),
    "awq-qweight": (
        _int4_edit("awq", tensor="model.layers.0.mlp.up_proj.qweight", shape=(32, 7)),
        r"checkpoint tensor model\.layers\.0\.mlp\.up_proj\.qweight: shard 'up' qweight has "
        r"shape \(32, 7\), expected \(32, 8\)",
    ),
    "w4a16-bits": (
        _int4_edit("w4a16", lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=2)),
        r"pack-quantized with 2-bit int weights is not supported; splitserve loads 4-bit",
    ),
    "w4a16-zero-point": (
        _int4_edit(
            "w4a16-asym",
            tensor="model.layers.1.mlp.down_proj.weight_zero_point",
            shape=(4, 1),
        ),
        r"checkpoint tensor model\.layers\.1\.mlp\.down_proj\.weight_zero_point has shape "
        r"\(4, 1\), the model expects \(4, 2\)",
    ),
}


@pytest.mark.parametrize("case", list(INT4_BAD))
def test_bad_int4_checkpoint_fails_before_any_process(case, good_model, tmp_path, spawned, capsys):
    from splitserve.testing.int4_pack import pack_checkpoint

    (fmt, edit), message = INT4_BAD[case]
    folder, _ = pack_checkpoint(good_model, tmp_path / "q", fmt)
    edit(folder)
    code = cli.main(["serve", str(folder)])
    err = capsys.readouterr().err
    assert code == 2
    assert spawned == []
    assert re.search(message, err), err


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory):
    from splitserve.testing.mxfp4_pack import pack_checkpoint

    root = tmp_path_factory.mktemp("preflight_mxfp4")
    dense = build_model(
        root / "gpt-oss",
        "gpt_oss",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=32,
        num_layers=2,
        head_dim=8,
        num_local_experts=4,
        sliding_window=8,
        max_position_embeddings=128,
    )
    return pack_checkpoint(dense, root / "gpt-oss-mxfp4")[0]


MXFP4_BAD = {
    "scales": (
        "model.layers.1.mlp.experts.down_proj_scales",
        (4, 32, 2),
        r"checkpoint tensor model\.layers\.1\.mlp\.experts\.down_proj_scales has shape "
        r"\(4, 32, 2\), the model expects \(4, 32, 1\)",
    ),
    "blocks": (
        "model.layers.0.mlp.experts.gate_up_proj_blocks",
        (4, 64, 1, 8),
        r"checkpoint tensor model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks has shape "
        r"\(4, 64, 1, 8\), the model expects \(4, 64, 1, 16\)",
    ),
}


def test_good_mxfp4_checkpoint_passes_preflight(mxfp4_model, spawned):
    with pytest.raises(Spawned):
        cli.main(["serve", str(mxfp4_model), "--quantization", "mxfp4"])
    assert len(spawned) == 1


@pytest.mark.parametrize("case", list(MXFP4_BAD))
def test_bad_mxfp4_checkpoint_fails_before_any_process(
    case, mxfp4_model, tmp_path, spawned, capsys
):
    tensor, shape, message = MXFP4_BAD[case]
    folder = _copy(mxfp4_model, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state[tensor] = torch.ones(shape, dtype=torch.uint8)
    save_file(state, folder / "model.safetensors")
    code = cli.main(["serve", str(folder)])
    err = capsys.readouterr().err
    assert code == 2
    assert spawned == []
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
    dead = types.SimpleNamespace(
        name="test",
        proc=types.SimpleNamespace(returncode=0),
        failure_line=lambda: "",
        log_path=pathlib.Path("/nonexistent/test.log"),
    )
    monkeypatch.setattr(launcher.Stack, "dead", lambda self: dead)
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
        [
            sys.executable,
            "-m",
            "splitserve.entrypoints.cli",
            "--log-level",
            "debug",
            "serve",
            str(folder),
        ]
        + ["--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "splitserve serve: error: unsupported model architecture" in proc.stderr
    assert ", ".join(sorted(MODEL_REGISTRY)) in proc.stderr
    assert "starting " not in proc.stderr  # Stack.spawn logs each start at debug level
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


# A wrong-shaped tensor per newer architecture: the q/k norm of Qwen3, one expert's
# projection for the MoE models (per-expert names, as transformers 5 saves them).
ARCH_MODELS = {
    "qwen3": (
        dict(head_dim=16),
        "model.layers.1.self_attn.k_norm.weight",
        r"k_norm\.weight has shape \(12,\), the model expects \(16,\)",
    ),
    "mixtral": (
        dict(num_local_experts=4),
        "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        r"experts\.3\.w2\.weight: expert 3 'w2' weight has shape \(12, 64\), expected \(32, 64\)",
    ),
    "qwen3_moe": (
        dict(num_experts=4, mlp_only_layers=[0]),
        "model.layers.1.mlp.experts.2.up_proj.weight",
        r"experts\.2\.up_proj\.weight: expert 2 'up_proj' weight has shape \(12, 32\), "
        r"expected \(32, 32\)",
    ),
}


@pytest.fixture(scope="module")
def arch_model(good_model, tmp_path_factory):
    """arch -> a tiny checkpoint of it (the tokenizer copied from good_model, not trained)."""
    from splitserve.testing import demo_model

    root = tmp_path_factory.mktemp("preflight_archs")
    built = {}

    def copy_tokenizer(out_dir, **_kwargs):
        shutil.copytree(good_model, out_dir, dirs_exist_ok=True, ignore=_not_tokenizer)
        return out_dir

    def get(arch):
        if arch not in built:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(demo_model, "build_tokenizer", copy_tokenizer)
                built[arch] = build_model(
                    root / arch,
                    arch,
                    vocab_size=300,
                    hidden_size=32,
                    intermediate_size=64,
                    num_layers=2,
                    max_position_embeddings=128,
                    **ARCH_MODELS[arch][0],
                )
        return built[arch]

    return get


def _not_tokenizer(folder, names):
    return [n for n in names if n.endswith(".safetensors") or n == "config.json"]


@pytest.mark.parametrize("arch", list(ARCH_MODELS))
def test_newer_architectures_pass_and_a_wrong_shape_is_named(
    arch, arch_model, tmp_path, spawned, capsys
):
    folder = arch_model(arch)
    for pp in ("1", "2"):  # every rank's slice checks out: the launcher starts a process
        with pytest.raises(Spawned):
            cli.main(["serve", str(folder), "--pipeline-parallel-size", pp])
    assert len(spawned) == 2
    spawned.clear()
    _, name, message = ARCH_MODELS[arch]
    bad = _copy(folder, tmp_path / "bad")
    state = load_file(bad / "model.safetensors")
    state[name] = state[name][:12]
    save_file(state, bad / "model.safetensors")
    assert cli.main(["serve", str(bad)]) == 2
    err = capsys.readouterr().err
    assert spawned == []
    assert re.search(message, err), err
