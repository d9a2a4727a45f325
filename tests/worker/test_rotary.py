"""The worker's rotary module against transformers: config reading (both styles), inverse
frequencies, and the in-place rotation through the kernels' dispatch."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from splitserve.kernels.rotary import compute_inv_freq
from splitserve.worker.layers import RotaryEmbedding, rope_parameters

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    "yarn_mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 256,
        "mscale": 0.7,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
        "beta_slow": 2,
    },
}


def _config(rope: dict) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        rope_parameters=dict(rope),
    )


@pytest.mark.parametrize("name", sorted(ROPES))
def test_inv_freq_matches_transformers(name):
    config = _config(ROPES[name])
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        expected, scale = (
            transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(
                config
            )
        )
    else:
        expected, scale = ROPE_INIT_FUNCTIONS[rope_type](config)
    got, got_scale = compute_inv_freq(rope_parameters(config), 64, max_position_embeddings=2048)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert got_scale == pytest.approx(scale)


def test_legacy_rope_theta_and_rope_scaling():
    legacy = {
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    }
    params = rope_parameters(legacy)
    assert params["rope_type"] == "llama3" and params["rope_theta"] == 500000.0
    assert params["original_max_position_embeddings"] == 8192
    assert rope_parameters({})["rope_theta"] == 10000.0
    assert rope_parameters({"rope_theta": 1e6})["rope_type"] == "default"


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="'longrope'.*default.*linear.*llama3.*yarn"):
        compute_inv_freq({"rope_type": "longrope"}, 64)


@pytest.mark.parametrize("joint", [True, False], ids=["qkv-view", "separate"])
def test_rotary_matches_transformers_apply(joint):
    """q and k rotate in place; as views of one fused qkv row (the model's layout) they go
    through the joint fast path, as separate tensors through two passes."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = _config(ROPES["yarn"])
    rope = RotaryEmbedding(64, 300, rope_parameters(config), 2048)
    positions = torch.tensor([0, 5, 299, 17])
    q, k = torch.randn(4, 4 * 64), torch.randn(4, 2 * 64)
    v = torch.randn(4, 2 * 64)
    if joint:
        qkv = torch.cat([q, k, v], dim=1)
        q_in, k_in = qkv[:, :256].view(4, 4, 64), qkv[:, 256:384].view(4, 2, 64)
    else:
        q_in, k_in = q.clone().view(4, 4, 64), k.clone().view(4, 2, 64)
    q_out, k_out = rope(positions, q_in, k_in)
    assert q_out is q_in and k_out is k_in
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    eq, ek = apply_rotary_pos_emb(
        q.view(1, 4, 4, 64).transpose(1, 2), k.view(1, 4, 2, 64).transpose(1, 2), cos, sin
    )
    torch.testing.assert_close(
        q_in.reshape(4, -1), eq.transpose(1, 2).reshape(4, -1), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        k_in.reshape(4, -1), ek.transpose(1, 2).reshape(4, -1), atol=1e-6, rtol=1e-6
    )
    if joint:  # v, past q and k in the same rows, is untouched
        assert torch.equal(qkv[:, 384:], v)


def test_rotary_table_built_after_meta_construction():
    """The loader builds models on the meta device: only a placeholder exists until
    `init_cache` runs again on the materialized module."""
    params = {"rope_type": "default", "rope_theta": 10000.0}
    with torch.device("meta"):
        rope = RotaryEmbedding(64, 32, params)
    assert rope.cos_sin_cache.is_meta and rope.cos_sin_cache.shape == (32, 64)
    rope.to_empty(device="cpu")
    rope.init_cache()
    fresh = RotaryEmbedding(64, 32, params)
    assert torch.equal(rope.cos_sin_cache, fresh.cos_sin_cache)
    assert rope.cos_sin_cache.dtype == torch.float32
