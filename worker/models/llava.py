"""LLaVA (1.5 style): a CLIP vision tower, a two-layer projector, a decoder-only language model.

Module names mirror the checkpoint that transformers writes (`vision_tower.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`); checkpoints
that nest the tower one level deeper (`vision_tower.vision_model.*`) or use transformers' own
module names (`model.language_model.*`) are renamed on load (`checkpoint_name`).

The runner asks `embed_images` for the embeddings of each image once, then calls `forward`
with `inputs_embeds` where the image's placeholder token positions hold them (see
worker/multimodal.py). The whole model lives on one rank: no pipeline parallelism.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.worker.models.clip import CLIPVisionTower
from splitserve.worker.models.llama import LlamaForCausalLM, MistralForCausalLM
from splitserve.worker.models.multimodal_lm import MultiModalCausalLM
from splitserve.worker.models.qwen2 import Qwen2ForCausalLM

_TEXT_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}
LLAVA_RENAMES = [
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^model\.vision_tower\.(vision_model\.)?"), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
]
"""Checkpoint names of a LLaVA-layout model (either transformers' older or newer layout) ->
this implementation's: the vision tower, the projector and the language model (also read by
LLaVA-like models: MiniMax-VL-01)."""
_PROJECTOR_ACTS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class LlavaMultiModalProjector(nn.Module):
    """Vision features (one or several layers, concatenated) -> the text model's width."""

    def __init__(self, config: Any, num_feature_layers: int) -> None:
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = bool(getattr(config, "multimodal_projector_bias", True))
        act = getattr(config, "projector_hidden_act", "gelu")
        if act not in _PROJECTOR_ACTS:
            raise ValueError(
                f"unsupported projector_hidden_act {act!r}; supported: {sorted(_PROJECTOR_ACTS)}"
            )
        self.linear_1 = nn.Linear(vision * num_feature_layers, text, bias=bias)
        self.act = _PROJECTOR_ACTS[act]
        self.linear_2 = nn.Linear(text, text, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(MultiModalCausalLM):
    """LLaVA-1.5 on one rank; `compute_logits` is the language model's lm_head."""

    supports_images = True
    packed_modules = LlamaForCausalLM.packed_modules
    renames = LLAVA_RENAMES

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
        self.check_one_rank(is_first, is_last, "LLaVA")
        self.config = config
        text = config.text_config
        text_cls = _TEXT_MODELS.get(getattr(text, "model_type", None))
        if text_cls is None:
            raise ValueError(
                f"unsupported LLaVA language model {text.model_type!r}; supported: "
                f"{', '.join(sorted(_TEXT_MODELS))}"
            )
        layers = config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.feature_strategy = config.vision_feature_select_strategy
        if self.feature_strategy not in ("default", "full"):
            raise ValueError(
                f"unsupported vision_feature_select_strategy {self.feature_strategy!r}; "
                "supported: default, full"
            )
        image_token = getattr(config, "image_token_id", None)
        self.image_token_id = int(
            image_token if image_token is not None else config.image_token_index
        )
        self.vision_tower = CLIPVisionTower(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config, len(self.feature_layers))
        self.language_model = text_cls(text, start_layer, end_layer, True, True, max_positions)

    @property
    def num_image_tokens(self) -> int:
        """Embeddings (placeholder tokens) per image."""
        vc = self.config.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        return patches + (1 if self.feature_strategy == "full" else 0)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """[channels, height, width] of one processed image."""
        vc = self.config.vision_config
        return (vc.num_channels, vc.image_size, vc.image_size)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, num_image_tokens, text hidden]."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        states = self.vision_tower(pixel_values.to(dtype), self.feature_layers)
        if self.feature_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))
