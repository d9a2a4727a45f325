"""cos/sin cache builders against transformers' ROPE_INIT_FUNCTIONS and Llama's rotary module."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama

from splitserve.kernels.rotary import build_cos_sin_cache, compute_inv_freq, rotary_dim_of

HEAD_DIM = 128
MAX_POS = 4096

ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default_theta_500k": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
    },
    "yarn": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "yarn_mscale": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
        "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2,
        "original_max_position_embeddings": 512,
    },
    "yarn_attention_factor_no_truncate": {
        "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "attention_factor": 1.3,
        "truncate": False, "original_max_position_embeddings": 256,
    },
    "yarn_implied_factor": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
        "original_max_position_embeddings": 1024,
    },
    "yarn_partial": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 1024,
    },
}  # fmt: skip


def _hf_config(params: dict) -> modeling_llama.LlamaConfig:
    return modeling_llama.LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(params),
    )


def _hf_inv_freq(params: dict) -> tuple[torch.Tensor, float]:
    config = _hf_config(params)
    if params["rope_type"] == "default":
        return modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config)


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_inv_freq_matches_transformers(case):
    params = ROPE_CASES[case]
    expected, expected_scaling = _hf_inv_freq(params)
    inv_freq, scaling = compute_inv_freq(
        params, HEAD_DIM, rotary_dim_of(params, HEAD_DIM), max_position_embeddings=MAX_POS
    )
    assert inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, expected, atol=0, rtol=1e-6)
    assert scaling == pytest.approx(expected_scaling, rel=1e-12)


@pytest.mark.parametrize("case", ["default", "linear", "llama3", "yarn", "yarn_mscale"])
def test_cos_sin_cache_matches_hf_rotary_embedding(case):
    params = ROPE_CASES[case]
    rope = modeling_llama.LlamaRotaryEmbedding(_hf_config(params))
    positions = torch.tensor([[0, 1, 7, 100, 1023, 1024, 4095]])
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), positions)  # [1, P, D], halves repeated
    cache = build_cos_sin_cache(params, HEAD_DIM, MAX_POS, max_position_embeddings=MAX_POS)
    assert cache.shape == (MAX_POS, HEAD_DIM)
    half = HEAD_DIM // 2
    rows = cache[positions[0]]
    torch.testing.assert_close(rows[:, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(rows[:, half:], sin[0, :, :half], atol=1e-6, rtol=0)
    if case == "yarn_mscale":
        assert rope.attention_scaling != 1.0  # the scaling really is exercised


def test_unsupported_rope_types_are_rejected():
    with pytest.raises(ValueError, match="dynamic"):
        compute_inv_freq({"rope_type": "dynamic", "factor": 2.0}, HEAD_DIM)
    with pytest.raises(ValueError, match="rotary_dim"):
        compute_inv_freq({"rope_type": "default"}, 64, rotary_dim=66)


def test_legacy_rope_scaling_type_key():
    inv_freq, _ = compute_inv_freq({"type": "linear", "factor": 2.0}, 64)
    base, _ = compute_inv_freq(None, 64)
    torch.testing.assert_close(inv_freq * 2, base)
