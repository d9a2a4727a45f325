"""splitserve.common.lora (no torch): --lora-modules forms, path safety, adapter config refusals."""

from __future__ import annotations

import builtins
import io
import json
import os

import pytest

from splitserve.common.lora import (
    LoRAModule,
    LoRAPathError,
    allowed_roots,
    parse_lora_modules,
    read_adapter_config,
    resolve_adapter_path,
)

GOOD = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
    "modules_to_save": None,
    "use_dora": False,
}


def _adapter(folder, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({**GOOD, **overrides}))
    return folder


def test_lora_modules_forms():
    mods = parse_lora_modules(["a=/x/a", '{"name": "b", "path": "/x/b", "base_model_name": "m"}'])
    assert mods == [LoRAModule("a", "/x/a"), LoRAModule("b", "/x/b", "m")]
    for bad in (["a"], ["=p"], ['{"name": "a"}'], ["{oops"], ["a=/x", "a=/y"]):
        with pytest.raises(ValueError):
            parse_lora_modules(bad)


def test_paths_outside_the_root_are_refused_without_reading(tmp_path, monkeypatch):
    root = tmp_path / "root"
    _adapter(root / "ok")
    outside = _adapter(tmp_path / "outside")
    os.symlink(outside, root / "link")
    roots = allowed_roots(str(root), [])
    assert resolve_adapter_path("ok", roots) == (root / "ok").resolve()
    assert resolve_adapter_path(str(root / "ok"), roots) == (root / "ok").resolve()

    opened = []
    real_open = io.open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr(builtins, "open", spy)
    for bad in ("../outside", str(outside), "link", str(root / "ok" / ".." / ".." / "outside")):
        with pytest.raises(LoRAPathError, match="outside the allowed root"):
            resolve_adapter_path(bad, roots)
    assert not [p for p in opened if str(tmp_path / "outside") in p]
    with pytest.raises(LoRAPathError, match="no LoRA root"):
        resolve_adapter_path("ok", [])
    with pytest.raises(LoRAPathError, match="not a folder"):
        resolve_adapter_path("missing", roots)
    # Default roots: only the --lora-modules folders themselves.
    only = allowed_roots(None, [LoRAModule("ok", str(root / "ok"))])
    assert resolve_adapter_path(str(root / "ok"), only)
    with pytest.raises(LoRAPathError):
        resolve_adapter_path(str(outside), only)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["score"]}, "modules_to_save"),
        ({"trainable_token_indices": {"q_proj": [5]}}, "trainable_token_indices of 'q_proj'"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "embed_tokens"),
        ({"target_modules": ".*proj"}, "target_modules"),
        (
            {"target_modules": ["q_proj", "w1", "w2"]},
            r"\['w1', 'w2'\] are MoE expert or router modules",
        ),
        ({"bias": "all"}, "bias"),
        ({"r": 32}, "max-lora-rank"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ],
)
def test_unsupported_adapter_configs_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        read_adapter_config(_adapter(tmp_path / "a", **overrides), max_lora_rank=16)


def test_scaling(tmp_path):
    assert read_adapter_config(_adapter(tmp_path / "a"), 16).scaling == 2.0
    rs = read_adapter_config(_adapter(tmp_path / "b", use_rslora=True, r=4), 16)
    assert rs.scaling == 16 / 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--enable-lora", "--lora-extra-vocab-size", "-1"], "lora_extra_vocab_size must be"),
        (["--lora-extra-vocab-size", "8"], "--lora-extra-vocab-size 8 needs --enable-lora"),
        (["--lora-modules", "a=/x"], "need --enable-lora"),
        (["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras"),
        (["--enable-lora", "--max-lora-rank", "0"], "max_lora_rank"),
        (["--enable-lora", "--lora-root", "{root}", "--lora-modules", "a={outside}"], "outside"),
        (["--enable-lora", "--lora-modules", "a={root}/dora"], "DoRA"),
    ],
)
def test_serve_refuses_bad_lora_flags_at_start(tmp_path, capsys, flags, message):
    from splitserve.entrypoints.cli import main

    root = tmp_path / "root"
    _adapter(root / "dora", use_dora=True)
    outside = _adapter(tmp_path / "outside")
    argv = [f.format(root=root, outside=outside) for f in flags]
    assert main(["serve", str(tmp_path / "no-model"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_adapter_name_must_differ_from_the_base_model(tmp_path):
    from splitserve.gateway.config import GatewayConfig
    from splitserve.gateway.lora_registry import LoRARegistry

    ad = _adapter(tmp_path / "ad")
    cfg = GatewayConfig(
        served_model_name=["m"], enable_lora=True, lora_modules=[f"m={ad}"], lora_root=None
    )
    with pytest.raises(ValueError, match="base model's name"):
        LoRARegistry(cfg)
    ok = LoRARegistry(GatewayConfig(enable_lora=True, lora_modules=[f"x={ad}"]))
    # Checked here; loaded into the scheduler (which owns adapter identity) when it starts.
    assert ok.startup == [("x", ad.resolve(), None)] and ok.get("x") is None


def test_vocab_modules_are_read(tmp_path):
    cfg = read_adapter_config(
        _adapter(
            tmp_path / "a",
            modules_to_save=["lm_head", "embed_tokens"],
            trainable_token_indices=[7, 8],
        ),
        16,
    )
    assert cfg.modules_to_save == ("embed_tokens", "lm_head")
    assert cfg.trainable_token_indices == (("embed_tokens", (7, 8)),)
    both = read_adapter_config(
        _adapter(tmp_path / "b", trainable_token_indices={"embed_tokens": [9], "lm_head": [9]}), 16
    )
    assert both.trainable_token_indices == (("embed_tokens", (9,)), ("lm_head", (9,)))


def test_extra_vocab_flag_reaches_the_scheduler_from_a_worker():
    """A worker started with --lora-extra-vocab-size fixes it; a scheduler left at the default
    takes it (its prompt-id bound), and a scheduler fixed to another value is refused."""
    import argparse

    from splitserve.common.engine_config import (
        EngineConfigConflict,
        adopt,
        agree,
        engine_values,
        from_proto,
        to_proto,
    )
    from splitserve.entrypoints.config_cli import add_config_flags, build_config
    from splitserve.scheduler.config import SchedulerConfig
    from splitserve.worker.config import WorkerConfig

    def parse(cls, argv):
        parser = argparse.ArgumentParser()
        add_config_flags(parser, cls)
        return build_config(cls, parser.parse_args(argv))

    worker = parse(WorkerConfig, ["--enable-lora", "--lora-extra-vocab-size", "32"])
    sent = from_proto(to_proto(engine_values(worker, "worker rank 0")), "worker rank 0")
    sched = SchedulerConfig()
    adopt(sched, agree(engine_values(sched, "scheduler"), sent))
    assert (sched.enable_lora, sched.lora_extra_vocab_size) == (True, 32)
    other = parse(SchedulerConfig, ["--enable-lora", "--lora-extra-vocab-size", "16"])
    with pytest.raises(EngineConfigConflict, match="lora_extra_vocab_size"):
        agree(engine_values(other, "scheduler"), sent)
