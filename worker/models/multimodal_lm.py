"""What an encoder + projector + decoder model (LLaVA, Qwen2-Audio) shares: the language model
under `language_model`, run on one rank from token ids or from input embeddings that hold the
encoder's outputs at the placeholder positions (worker/multimodal.py fills them)."""

from __future__ import annotations

import re

import torch
from torch import nn

from splitserve.worker.pipeline import IntermediateTensors


class MultiModalCausalLM(nn.Module):
    """The decoder half of a multimodal model. Subclasses set `language_model` (a causal LM
    of this package) and `renames`, the checkpoint name prefixes they move."""

    renames: list[tuple[re.Pattern, str]] = []
    """(pattern, replacement) applied to the first matching checkpoint name."""

    @staticmethod
    def check_one_rank(is_first: bool, is_last: bool, what: str) -> None:
        if not (is_first and is_last):
            raise ValueError(
                f"{what} models run on one rank: pipeline parallelism is not supported"
            )

    @property
    def model(self):
        """The decoder stack (what the loader and LoRA look for as `model.model`)."""
        return self.language_model.model

    @property
    def lm_head(self) -> nn.Linear:
        return self.language_model.lm_head

    @classmethod
    def checkpoint_name(cls, name: str) -> str:
        """The module path of a checkpoint tensor in this model."""
        for pattern, replacement in cls.renames:
            if pattern.match(name):
                return pattern.sub(replacement, name, count=1)
        return name

    def owns_weight(self, name: str) -> bool:
        """Every checkpoint tensor belongs to the one rank."""
        return True

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm; `inputs_embeds` (with the encoder's outputs in
        place) replaces the token embedding when given."""
        lm = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_tokens(input_ids)
        residual = None
        for i in range(lm.start_layer, lm.end_layer):
            hidden, residual = lm.layers[i](positions, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    def post_materialize(self) -> None:
        self.language_model.post_materialize()
