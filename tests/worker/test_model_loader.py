"""Loading checkpoints: formats, shards, tied embeddings, pipeline slices, hub ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_loader import load_model
from splitserve.worker.pipeline import IntermediateTensors, layer_range

from .utils import hf_logits, model_forward

TOKENS = [3, 17, 42, 8, 91, 5, 60, 33, 2, 71]


def _load(path, **kwargs):
    return load_model(WorkerConfig(model=str(path), **kwargs))


def test_sharded_safetensors_match_transformers(checkpoint):
    path = checkpoint("sharded", max_shard_size="20KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    assert (path / "model.safetensors.index.json").exists()
    loaded = _load(path)
    torch.testing.assert_close(
        model_forward(loaded.model, TOKENS), hf_logits(path, TOKENS), atol=1e-5, rtol=1e-5
    )


def test_several_safetensors_without_index(checkpoint, tmp_path):
    src = checkpoint("sharded", max_shard_size="20KB")
    shutil.copytree(src, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").unlink()
    loaded = _load(tmp_path / "m")
    torch.testing.assert_close(
        model_forward(loaded.model, TOKENS), hf_logits(src, TOKENS), atol=1e-5, rtol=1e-5
    )


def test_tied_embeddings_share_one_tensor(checkpoint):
    path = checkpoint("qwen2_tied", arch="qwen2", tie=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    loaded = _load(path)
    model = loaded.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None  # qwen2 q/k/v bias
    assert model.model.layers[0].self_attn.o_proj.bias is None
    torch.testing.assert_close(
        model_forward(model, TOKENS), hf_logits(path, TOKENS), atol=1e-5, rtol=1e-5
    )


def test_missing_lm_head_falls_back_to_embeddings(checkpoint, tmp_path):
    src = checkpoint("llama_untied_src")
    out = tmp_path / "nohead"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    state = load_file(src / "model.safetensors")
    embed = state.pop("lm_head.weight") * 0 + state["model.embed_tokens.weight"]
    save_file(state, out / "model.safetensors")
    loaded = _load(out)
    # the state dict gives the plain weight whatever layout serving keeps it in (oneDNN on CPU)
    torch.testing.assert_close(loaded.model.state_dict()["lm_head.weight"], embed)


def test_pt_format(checkpoint):
    path = checkpoint("llama_bin", safe=False)
    assert not list(path.glob("*.safetensors"))
    expected = hf_logits(path, TOKENS)
    for fmt in ("auto", "pt"):
        loaded = _load(path, load_format=fmt)
        torch.testing.assert_close(
            model_forward(loaded.model, TOKENS), expected, atol=1e-5, rtol=1e-5
        )
    with pytest.raises(FileNotFoundError, match="safetensors"):
        _load(path, load_format="safetensors")


def test_dummy_format_needs_only_the_config(checkpoint, tmp_path):
    (tmp_path / "cfg").mkdir()
    shutil.copy(checkpoint("llama_untied_src") / "config.json", tmp_path / "cfg")
    a = _load(tmp_path / "cfg", load_format="dummy", seed=3)
    b = _load(tmp_path / "cfg", load_format="dummy", seed=3)
    for (name, pa), (_, pb) in zip(  # state dicts: plain weights, packed ones included
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert pa.abs().max() <= 1e-3, name
        assert torch.equal(pa, pb), name
    assert torch.isfinite(model_forward(a.model, TOKENS)).all()


def test_layer_range_splits_like_vllm():
    assert [layer_range(3, r, 2) for r in range(2)] == [(0, 2), (2, 3)]
    assert [layer_range(10, r, 4) for r in range(4)] == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert layer_range(5, 0, 1) == (0, 5)
    with pytest.raises(ValueError, match="cannot split"):
        layer_range(2, 0, 3)


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", True)])
def test_two_rank_split_reproduces_one_rank(arch, tie, checkpoint):
    path = checkpoint(f"{arch}_pp_{tie}", arch=arch, tie=tie)
    full = _load(path).model
    rank0 = _load(path, rank=0, pipeline_parallel_size=2).model
    rank1 = _load(path, rank=1, pipeline_parallel_size=2).model
    names0 = {n for n, _ in rank0.named_parameters()}
    names1 = {n for n, _ in rank1.named_parameters()}
    assert "model.embed_tokens.weight" in names0 and "lm_head.weight" not in names0
    assert not any(n.startswith(("model.norm", "model.layers.2.")) for n in names0)
    assert {"model.norm.weight", "lm_head.weight"} <= names1
    assert not any(
        n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1.")) for n in names1
    )
    hidden = model_forward(rank0, TOKENS)
    assert isinstance(hidden, IntermediateTensors)
    logits = model_forward(rank1, TOKENS, hidden)
    torch.testing.assert_close(logits, model_forward(full, TOKENS), atol=1e-6, rtol=1e-6)


def test_eos_ids_union_config_and_generation_config(tiny_llama):
    assert _load(tiny_llama).eos_token_ids == [2, 5]


def test_unknown_architecture_names_supported_ones(checkpoint, tmp_path):
    (tmp_path / "gpt").mkdir()
    config = json.loads((checkpoint("llama_untied_src") / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        _load(tmp_path / "gpt", load_format="dummy")


def test_max_model_len_above_the_config_is_refused(tiny_llama):
    with pytest.raises(
        ValueError,
        match=r"--max-model-len 1000 is longer than the model.s context length \(max_position_embeddings=256",
    ):
        _load(tiny_llama, max_model_len=1000)
    assert _load(tiny_llama, max_model_len=100).max_model_len == 100


def test_hub_id_resolves_through_local_cache(tiny_llama, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_llama, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = _load("tiny-org/tiny-llama")
    assert loaded.path.resolve() == snapshot.resolve()
    torch.testing.assert_close(
        model_forward(loaded.model, TOKENS), hf_logits(tiny_llama, TOKENS), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(FileNotFoundError, match="tiny-org/absent"):
        _load("tiny-org/absent")
