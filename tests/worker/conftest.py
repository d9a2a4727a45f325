"""Tiny random checkpoints for the worker tests, saved with transformers (no tokenizer needed).

Without CUDA the Triton attention backend runs in the Triton interpreter; TRITON_INTERPRET must
be set before any kernel is decorated (imported), hence here, as tests/kernels does.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


def save_checkpoint(
    out: pathlib.Path,
    arch: str = "llama",
    *,
    num_layers: int = 3,
    vocab_size: int = 96,
    tie: bool = False,
    max_shard_size: str | None = None,
    safe: bool = True,
    eos: list[int] | None = None,
    seed: int = 0,
    **config_kwargs,
) -> pathlib.Path:
    """Save a tiny random model and return its folder."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=config_kwargs.pop("num_key_value_heads", 2),
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        tie_word_embeddings=tie,
        eos_token_id=2,
        bos_token_id=1,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if not safe:
        # transformers 5 writes safetensors only; write a plain torch state dict instead.
        out.mkdir(parents=True, exist_ok=True)
        config.architectures = [ARCHS[arch][1]]
        config.save_pretrained(out)
        state = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
        torch.save(state, out / "pytorch_model.bin")
    else:
        model.save_pretrained(out, **kwargs)
    if eos is not None:
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, **kwargs) -> folder, cached by name for the session."""
    root = tmp_path_factory.mktemp("ckpt")
    built: dict[str, pathlib.Path] = {}

    def get(name: str, **kwargs) -> pathlib.Path:
        if name not in built:
            built[name] = save_checkpoint(root / name, **kwargs)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_llama(checkpoint):
    return checkpoint("llama", eos=[2, 5])
