"""Rotary kernel vs reference; the reference vs Hugging Face's Llama (neox) and GPT-J layouts."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gptj import modeling_gptj
from transformers.models.llama import modeling_llama

from splitserve.kernels.reference import apply_rotary_ref
from splitserve.kernels.rotary import build_cos_sin_cache, cos_sin_cache_from_inv_freq
from splitserve.kernels.rotary_kernel import apply_rotary

from .kernel_test_utils import DEVICE, DTYPES, TOL, assert_close, requires_compiled_gpu

MAX_POS = 64


def _cache(rot: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return build_cos_sin_cache({"rope_theta": 10000.0}, rot, MAX_POS, dtype=dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    "num_tokens,hq,hk,head_dim,rot",
    [
        (1, 1, 1, 64, 64),
        (5, 6, 2, 80, 80),
        (7, 4, 1, 96, 48),
        (3, 3, 3, 128, 32),
        (2, 2, 1, 256, 256),
    ],
)
def test_rotary_kernel(num_tokens, hq, hk, head_dim, rot, is_neox, dtype):
    q = torch.randn(num_tokens, hq, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(num_tokens, hk, head_dim, device=DEVICE).to(dtype)
    positions = torch.randint(0, MAX_POS, (num_tokens,), device=DEVICE)
    cache = _cache(rot)
    q_ref, k_ref = apply_rotary_ref(positions, q, k, cache, is_neox)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = apply_rotary(positions, q_in, k_in, cache, is_neox)
    assert q_out is q_in and k_out is k_in  # in place
    assert_close(q_in, q_ref, TOL)
    assert_close(k_in, k_ref, TOL)
    assert torch.equal(q_in[..., rot:], q[..., rot:])  # pass-through dims untouched


def test_rotary_kernel_on_qkv_views():
    """q and k as strided views of one fused qkv projection output, rotated in place."""
    t, hq, hk, d = 6, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEVICE)
    expected = qkv.clone()
    positions = torch.randint(0, MAX_POS, (t,), device=DEVICE)
    cache = _cache(d)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    q_ref, k_ref = apply_rotary_ref(positions, q, k, cache)
    expected[:, : hq * d] = q_ref.reshape(t, -1)
    expected[:, hq * d : (hq + hk) * d] = k_ref.reshape(t, -1)
    apply_rotary(positions, q, k, cache)
    assert_close(qkv, expected, TOL)


def test_reference_matches_hf_llama_neox():
    head_dim, t = 64, 9
    config = modeling_llama.LlamaConfig(
        hidden_size=256, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=MAX_POS
    )
    rope = modeling_llama.LlamaRotaryEmbedding(config)
    positions = torch.randint(0, MAX_POS, (t,))
    q, k = torch.randn(t, 4, head_dim), torch.randn(t, 2, head_dim)
    cos, sin = rope(q, positions[None])
    # HF layout: [B, H, T, D] with cos/sin [B, T, D].
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )
    cache = cos_sin_cache_from_inv_freq(rope.inv_freq, MAX_POS, rope.attention_scaling)
    q_ref, k_ref = apply_rotary_ref(positions, q, k, cache, is_neox=True)
    assert_close(q_ref, q_hf[0].transpose(0, 1), TOL)
    assert_close(k_ref, k_hf[0].transpose(0, 1), TOL)


def test_reference_matches_hf_gptj_interleaved():
    rot, head_dim, t = 32, 64, 7
    sincos_table = modeling_gptj.create_sinusoidal_positions(MAX_POS, rot)  # [P, rot]: sin ++ cos
    positions = torch.randint(0, MAX_POS, (t,))
    q = torch.randn(t, 3, head_dim)
    sincos = sincos_table[positions][None]  # [1, T, rot]
    sin, cos = torch.split(sincos, rot // 2, dim=-1)  # HF repeats each to pairs itself
    q_hf = q[None].clone()
    q_hf[..., :rot] = modeling_gptj.apply_rotary_pos_emb(q[None, ..., :rot], sin, cos)
    cache = torch.cat([sincos_table[:, rot // 2 :], sincos_table[:, : rot // 2]], dim=-1)
    q_ref, _ = apply_rotary_ref(positions, q, q[:, :1], cache, is_neox=False)
    assert_close(q_ref, q_hf[0], TOL)


def test_rotary_rejects_odd_rotary_dim():
    q = torch.randn(2, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(
            torch.zeros(2, dtype=torch.long, device=DEVICE), q, q, torch.zeros(8, 66, device=DEVICE)
        )


@requires_compiled_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", [True, False])
def test_bf16_on_gpu(is_neox):
    q = torch.randn(9, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(9, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    positions = torch.randint(0, MAX_POS, (9,), device=DEVICE)
    cache = _cache(64)
    q_ref, k_ref = apply_rotary_ref(positions, q, k, cache, is_neox)
    apply_rotary(positions, q, k, cache, is_neox)
    assert_close(q, q_ref, TOL)
    assert_close(k, k_ref, TOL)
