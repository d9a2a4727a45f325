"""--hf-overrides (the HF config the model is built from) and --ignore-patterns (weight files
skipped), on the worker and in `serve`'s preflight."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from splitserve.entrypoints.preflight import preflight
from splitserve.tokenizer_svc.config import TokenizerServiceConfig
from splitserve.worker import weight_files
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_loader import check_model, load_model

from .test_weight_loading import PROMPT, STEPS, _state, greedy


def test_hf_overrides_parsed_and_checked():
    assert WorkerConfig(hf_overrides={"b": 1, "a": {"c": 2}}).hf_overrides == (
        '{"a": {"c": 2}, "b": 1}'
    )
    with pytest.raises(ValueError, match="hf_overrides must be a JSON object"):
        WorkerConfig(hf_overrides="[1, 2]")
    with pytest.raises(ValueError, match="hf_overrides must be a JSON object"):
        WorkerConfig(hf_overrides="{nope")


@torch.inference_mode()
def test_hf_overrides_build_the_overridden_model(tiny_llama):
    import transformers

    loaded = load_model(
        WorkerConfig(model=str(tiny_llama), hf_overrides='{"num_hidden_layers": 1}')
    )
    assert len(loaded.model.model.layers) == 1
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.float32, num_hidden_layers=1
    )
    ids = list(PROMPT)
    for _ in range(STEPS):
        ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy(loaded.model) == ids[len(PROMPT) :]
    full = load_model(WorkerConfig(model=str(tiny_llama)))
    assert len(full.model.model.layers) > 1


def test_hf_overrides_seen_by_the_worker_and_preflight(tiny_llama):
    config = WorkerConfig(
        model=str(tiny_llama), hf_overrides='{"max_position_embeddings": 40}', max_model_len=64
    )
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        check_model(config)
    tokenizer = TokenizerServiceConfig(tokenizer=str(tiny_llama))
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        preflight(config, tokenizer)
    loaded = load_model(dataclasses.replace(config, max_model_len=None))
    assert loaded.max_model_len == 40


def test_ignore_patterns_skip_weight_files(tiny_llama, checkpoint, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    # A second, different copy of every tensor, read after model.safetensors when not ignored.
    decoy = checkpoint("llama_decoy", eos=[2, 5], seed=7)
    for f in decoy.glob("*.safetensors"):
        shutil.copy(f, folder / f"zz-{f.name}")
    expected = _state(tiny_llama)["model.embed_tokens.weight"]
    loaded = load_model(WorkerConfig(model=str(folder)))
    assert not torch.equal(loaded.model.model.embed_tokens.weight, expected)
    config = WorkerConfig(model=str(folder), ignore_patterns=["zz-*"])
    check_model(config)
    loaded = load_model(config)
    torch.testing.assert_close(loaded.model.model.embed_tokens.weight, expected)
    names = [f.name for f in weight_files.find_weight_files(folder, "auto", ["zz-*"]).files]
    assert names and not any(n.startswith("zz-") for n in names)
    with pytest.raises(FileNotFoundError, match="matches --ignore-patterns"):
        weight_files.find_weight_files(folder, "auto", ["*.safetensors"])


def test_ignore_patterns_reach_the_hub_download(tiny_llama, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_download(**kwargs):
        seen.update(kwargs)
        return str(tiny_llama)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    check_model(WorkerConfig(model="org/tiny", load_format="dummy"))
    assert seen["ignore_patterns"] == ["original/**/*"]  # vLLM's default
    check_model(WorkerConfig(model="org/tiny", load_format="dummy", ignore_patterns=["*.pt"]))
    assert seen["ignore_patterns"] == ["*.pt"]
