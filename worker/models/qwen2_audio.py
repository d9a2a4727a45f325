"""Qwen2-Audio: a Whisper-style audio encoder, a linear projector, a Qwen2 language model.

Module names mirror the checkpoint transformers writes (`audio_tower.*`,
`multi_modal_projector.linear.*`, `language_model.model.*`, `language_model.lm_head.*`);
transformers' newer nesting (`model.audio_tower.*`, `model.language_model.*`) is renamed on load.

An audio item arrives as the feature extractor made it: log-mel features [mel bins, frames]
padded to the encoder's fixed window (`2 * max_source_positions` frames, 30 s for the released
models), and the number of frames that hold audio. The encoder runs over the whole window as
transformers does (two convolutions, the second with stride 2; learned positions; pre-norm
layers whose attention ignores the padded positions; an average pool of 2), and the first
`num_audio_tokens(frames)` outputs replace the prompt's audio placeholder tokens. Feeding
only the audio frames would not give the same numbers: the convolution at the last audio frame
reads the padding's features.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.worker.models.multimodal_lm import MultiModalCausalLM
from splitserve.worker.models.qwen2 import Qwen2ForCausalLM

_RENAMES = [
    (re.compile(r"^model\.audio_tower\."), "audio_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
]
_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def num_audio_tokens(num_frames: int | torch.Tensor):
    """Encoder outputs (placeholder tokens) for `num_frames` mel frames of audio: the
    stride-2 convolution, then the pool of 2 (transformers' `_get_feat_extract_output_lengths`)."""
    after_conv = (num_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class AudioAttention(nn.Module):
    """Bidirectional multi-head attention; no bias on k_proj (Whisper's layout)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"audio d_model {dim} is not a multiple of its {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim]; mask [B, 1, 1, T] True where a key may be attended to."""
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), attn_mask=mask
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class AudioEncoderLayer(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        dim = config.d_model
        self.self_attn = AudioAttention(dim, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        act = config.activation_function
        if act not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported audio activation_function {act!r}; supported: {sorted(_ACTIVATIONS)}"
            )
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class Qwen2AudioEncoder(nn.Module):
    """Log-mel features [B, mel, 2 * max_source_positions] -> [B, max_source_positions // 2,
    d_model]."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "scale_embedding", False):
            raise ValueError("audio encoders with scale_embedding are not supported")
        dim = config.d_model
        self.num_mel_bins = config.num_mel_bins
        self.max_source_positions = config.max_source_positions
        self.conv1 = nn.Conv1d(config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, dim)
        self.layers = nn.ModuleList(AudioEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)

    @property
    def num_frames(self) -> int:
        """The fixed window, in mel frames, every item is padded to."""
        return 2 * self.max_source_positions

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """features [B, mel, num_frames]; frames [B]: how many frames hold audio."""
        weight = self.conv1.weight
        x = F.gelu(self.conv1(features.to(weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2) + self.embed_positions.weight
        # Keys past each item's audio are masked out (queries there are computed, then
        # dropped with the padding after the pool).
        valid = (frames.to(x.device) - 1) // 2 + 1
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]
        mask = mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)
        return self.layer_norm(x)


class Qwen2AudioForConditionalGeneration(MultiModalCausalLM):
    """Qwen2-Audio on one rank; `compute_logits` is the language model's lm_head."""

    supports_audio = True
    packed_modules = Qwen2ForCausalLM.packed_modules
    renames = _RENAMES

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
        self.check_one_rank(is_first, is_last, "Qwen2-Audio")
        self.config = config
        text = config.text_config
        if getattr(text, "model_type", None) != "qwen2":
            raise ValueError(
                f"unsupported Qwen2-Audio language model {text.model_type!r}; supported: qwen2"
            )
        token = getattr(config, "audio_token_id", None)
        self.audio_token_id = int(token if token is not None else config.audio_token_index)
        self.audio_tower = Qwen2AudioEncoder(config.audio_config)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear = nn.Linear(config.audio_config.d_model, text.hidden_size)
        self.language_model = Qwen2ForCausalLM(
            text, start_layer, end_layer, True, True, max_positions
        )

    @property
    def feature_shape(self) -> tuple[int, int]:
        """[mel bins, frames] of one processed audio item."""
        return (self.audio_tower.num_mel_bins, self.audio_tower.num_frames)

    @staticmethod
    def num_audio_tokens(num_frames: int) -> int:
        return int(num_audio_tokens(num_frames))

    def embed_audio(self, features: torch.Tensor, frames: torch.Tensor) -> list[torch.Tensor]:
        """features [B, mel, frames window], frames [B] -> per item [num_audio_tokens, hidden]."""
        out = self.multi_modal_projector.linear(self.audio_tower(features, frames))
        lengths = num_audio_tokens(frames).tolist()
        return [o[:n] for o, n in zip(out, lengths, strict=True)]
