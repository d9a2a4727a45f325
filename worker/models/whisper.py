"""Whisper: an audio encoder and a text decoder that cross-attends to it.

Module names mirror the checkpoint transformers writes (`model.encoder.*`, `model.decoder.*`,
`proj_out.weight`, which is tied to the decoder's token embedding unless the config says not).

The encoder takes log-mel features [mel bins, 2 * max_source_positions] (30 s for the released
models, always padded to that window, as transformers requires) and runs once per request
(worker/cross_attention.py keeps its result). Each decoder layer is pre-norm: causal
self-attention over the paged KV cache of the decoder tokens, cross-attention over the
request's encoder output (its keys and values projected once, held in the request's slot), an
MLP. Decoder positions are learned, up to `max_target_positions` (448 for the released models).
The attention scale multiplies q after its projection, as transformers does. transformers
ignores `scale_embedding` for Whisper; so does this.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.worker.attention import Attention
from splitserve.worker.cross_attention import cross_attend
from splitserve.worker.models.qwen2_audio import _ACTIVATIONS, AudioEncoderLayer
from splitserve.worker.pipeline import IntermediateTensors


class WhisperEncoder(nn.Module):
    """Log-mel features [B, mel, 2 * max_source_positions] -> [B, max_source_positions, d]."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.d_model
        self.num_mel_bins = config.num_mel_bins
        self.max_source_positions = config.max_source_positions
        self.conv1 = nn.Conv1d(config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, dim)
        self.layers = nn.ModuleList(AudioEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2) + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x, None)  # every position is attended to: Whisper masks nothing
        return self.layer_norm(x)


class _Projections(nn.Module):
    """q / k / v / out projections of one attention block (k without bias, Whisper's layout)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Whisper d_model {dim} is not a multiple of its {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim)


class WhisperSelfAttention(_Projections):
    """Causal self-attention of the decoder tokens over the paged KV cache."""

    def __init__(self, dim: int, num_heads: int, layer_idx: int) -> None:
        super().__init__(dim, num_heads)
        self.attn = Attention(num_heads, num_heads, self.head_dim, 1.0, layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.split(self.q_proj(x) * self.scaling)
        out = self.attn(q, self.split(self.k_proj(x)), self.split(self.v_proj(x)))
        return self.out_proj(out)


class WhisperCrossAttention(_Projections):
    """Attention of the decoder tokens over their request's encoder output; the keys and
    values come from the request's cross-attention slot (`kv` fills it once)."""

    def kv(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_out [B, L, d] -> keys and values [B, L, heads, head_dim]."""
        return self.split(self.k_proj(encoder_out)), self.split(self.v_proj(encoder_out))

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.split(self.q_proj(x) * self.scaling)
        return self.out_proj(cross_attend(q, *cache))


class WhisperDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        dim = config.d_model
        self.self_attn = WhisperSelfAttention(dim, config.decoder_attention_heads, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = WhisperCrossAttention(dim, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        act = config.activation_function
        if act not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported Whisper activation_function {act!r}; supported: "
                f"{sorted(_ACTIVATIONS)}"
            )
        self.act = _ACTIVATIONS[act]
        self.cross_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        """This layer's cross-attention slots (bound by the runner)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        if self.cross_cache is None:
            raise RuntimeError("the cross-attention slots are not bound to the decoder")
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), self.cross_cache)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.d_model
        self.max_target_positions = config.max_target_positions
        self.embed_tokens = nn.Embedding(config.vocab_size, dim)
        self.embed_positions = nn.Embedding(config.max_target_positions, dim)
        self.layers = nn.ModuleList(
            WhisperDecoderLayer(config, i) for i in range(config.decoder_layers)
        )
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperForConditionalGeneration(nn.Module):
    """Whisper on one rank. The runner calls `encode` + `cross_kv` once per request, binds
    the cross-attention slots (`bind_cross_caches`), then runs `forward` on decoder tokens
    inside a `cross_attention_context` naming each row's slot."""

    is_encoder_decoder = True
    supports_cuda_graphs = False
    """The cross-attention reads per-step slot indices the decode graphs do not capture."""

    def __init__(
        self,
        config: Any,
        start_layer: int,
        end_layer: int,
        is_first: bool,
        is_last: bool,
        max_positions: int,
    ) -> None:
        super().__init__()
        if not (is_first and is_last):
            raise ValueError(
                "Whisper models run on one rank: pipeline parallelism is not supported"
            )
        if max_positions > config.max_target_positions:
            raise ValueError(
                f"max_model_len {max_positions} is longer than the Whisper decoder's "
                f"max_target_positions {config.max_target_positions}"
            )
        self.config = config
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.model = nn.Module()
        self.model.encoder = WhisperEncoder(config)
        self.model.decoder = WhisperDecoder(config)
        if not self.tied:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    @staticmethod
    def checkpoint_name(name: str) -> str:
        # proj_out is the output projection; a tied one is the decoder embedding (the loader
        # skips "lm_head.weight" of a tied model).
        return re.sub(r"^proj_out\.", "lm_head.", name)

    def owns_weight(self, name: str) -> bool:
        return True

    def post_materialize(self) -> None:
        pass

    @property
    def num_decoder_layers(self) -> int:
        return len(self.model.decoder.layers)

    @property
    def feature_shape(self) -> tuple[int, int]:
        """[mel bins, frames] of one request's encoder input."""
        enc = self.model.encoder
        return (enc.num_mel_bins, 2 * enc.max_source_positions)

    @property
    def cross_kv_shape(self) -> tuple[int, int, int]:
        """[encoder positions, heads, head_dim] of one layer's cross-attention keys."""
        attn = self.model.decoder.layers[0].encoder_attn
        return (self.model.encoder.max_source_positions, attn.num_heads, attn.head_dim)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.encoder(features)

    def cross_kv(self, encoder_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention (keys, values) [B, L, heads, head_dim]."""
        return [layer.encoder_attn.kv(encoder_out) for layer in self.model.decoder.layers]

    def bind_cross_caches(self, caches: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        layers = self.model.decoder.layers
        for i, layer in enumerate(layers):
            layer.cross_cache = None if caches is None else caches[i]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is not None:
            raise ValueError("Whisper's decoder takes token ids, not input embeddings")
        return self.model.decoder(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.model.decoder.embed_tokens.weight if self.tied else self.lm_head.weight
        return F.linear(hidden_states, weight)
