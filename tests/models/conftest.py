"""Tiny random checkpoints shared by the model tests (built once per session).

Training the tokenizer dominates a build, so one tokenizer is trained and copied into every
model folder. Without CUDA the Triton attention backend runs in the Triton interpreter, which
must be switched on before any kernel is imported, hence TRITON_INTERPRET here.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from splitserve.testing import demo_model

LLAMA_EOS = [1, 4]  # </s> and <|im_end|>: two EOS ids in generation_config.json

MODEL_KWARGS: dict[str, dict] = {
    "llama": dict(
        arch="llama",
        extra_vocab=24,
        eos_token_ids=LLAMA_EOS,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
    ),
    "qwen2": dict(arch="qwen2", num_heads=4, num_kv_heads=2, max_position_embeddings=512),
    "mistral": dict(arch="mistral", num_heads=4, num_kv_heads=1, max_position_embeddings=512),
    # head_dim 32: q is 128 wide over a hidden size of 64; embeddings tied.
    "qwen3": dict(
        arch="qwen3", num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512
    ),
    # 8 experts, top-2, renormalised: decode tokens spread over most experts.
    "mixtral": dict(
        arch="mixtral",
        num_heads=4,
        num_kv_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    ),
    # Sparse layers 0 and 2 around a dense layer 1; top-2 not renormalised; q/k/v/o biases.
    "qwen3_moe": dict(
        arch="qwen3_moe",
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        attention_bias=True,
        max_position_embeddings=512,
    ),
    # gpt-oss: sliding (8 tokens) / full / sliding layers with sinks, YaRN, 4 biased experts
    # top-2 with a low SwiGLU limit so the clamps bite.
    "gpt_oss": dict(
        arch="gpt_oss",
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        swiglu_limit=1.5,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 128,
        },
    ),
    "llama3_rope": dict(
        arch="llama",
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "yarn_rope": dict(
        arch="llama",
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    ),
}


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Return build(name) -> folder of the named tiny checkpoint (cached for the session)."""
    root = tmp_path_factory.mktemp("models")
    tokenizer_dir = demo_model.build_tokenizer(root / "_tokenizer")
    built: dict[str, pathlib.Path] = {}

    def copy_tokenizer(out_dir, **_kwargs):
        shutil.copytree(tokenizer_dir, out_dir, dirs_exist_ok=True)
        return pathlib.Path(out_dir)

    def build(name: str) -> pathlib.Path:
        if name not in built:
            kwargs = dict(MODEL_KWARGS[name])
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(demo_model, "build_tokenizer", copy_tokenizer)
                built[name] = demo_model.build_model(root / name, kwargs.pop("arch"), **kwargs)
        return built[name]

    return build


@pytest.fixture(scope="session")
def mistral_sliding_path(model_factory, tmp_path_factory):
    """The mistral checkpoint with a 12-token sliding window (the weights do not change)."""
    import json

    out = tmp_path_factory.mktemp("mistral_sliding")
    shutil.copytree(model_factory("mistral"), out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config["sliding_window"] = 12
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def llama_path(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="session")
def qwen2_path(model_factory):
    return model_factory("qwen2")


@pytest.fixture(scope="session")
def mistral_path(model_factory):
    return model_factory("mistral")


@pytest.fixture(scope="module")
def llm(llama_path):
    """An in-process engine on the tiny Llama, one per test module (a module may override)."""
    from splitserve import LLM

    engine = LLM(str(llama_path), kv_cache_memory=8 << 20)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def checker(llm):
    """Independent checks of constrained outputs (structured_utils.Checker) over `llm`."""
    from .structured_utils import Checker

    return Checker(llm, LLAMA_EOS)
