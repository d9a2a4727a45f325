"""Qwen3: Llama layers plus a per-head RMSNorm of q and k (`q_norm`, `k_norm`) before rotary.

The config's `head_dim` is explicit (often not hidden_size // num_attention_heads); q/k/v and
o_proj carry a bias only when `attention_bias` says so, the MLP never; embeddings are tied when
`tie_word_embeddings` says so. Qwen3-MoE reuses the attention (see qwen3_moe.py).
"""

from __future__ import annotations

from typing import Any

import torch

from splitserve.worker.layers import RMSNorm, RotaryEmbedding
from splitserve.worker.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
)


class Qwen3Attention(LlamaAttention):
    """Llama attention with q_norm / k_norm over each head's D features, before rotary."""

    def __init__(
        self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool, o_bias: bool
    ) -> None:
        super().__init__(config, layer_idx, rotary_emb, qkv_bias, o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(self.qkv_proj(hidden_states))
        # The norms return fresh tensors; rotary then rotates those in place.
        q, k = self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))
        return self.o_proj(self.attn(q, k, v))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    decoder_layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 for one pipeline slice; biases and tying follow the config (Llama's defaults)."""

    model_cls = Qwen3Model
