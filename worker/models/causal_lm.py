"""What every decoder-only model class shares: its stack in `self.model`, an `lm_head` on the
last pipeline rank (tied to the input embedding when the config says so), and the forward and
logits that only delegate. A model class builds `self.model`, then calls `_init_lm_head`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitserve.worker.parallel_layers import lm_head
from splitserve.worker.pipeline import IntermediateTensors


class CausalLM(nn.Module):
    config: Any
    model: nn.Module
    """The decoder stack: `embed_tokens` (first rank, else None) and `forward(input_ids,
    positions, intermediate)`."""

    def _init_lm_head(self, config: Any, is_last: bool) -> None:
        self.lm_head = lm_head(config.hidden_size, config.vocab_size) if is_last else None
        self._tie_weights()

    @staticmethod
    def ties_embeddings(config: Any) -> bool:
        """Whether lm_head shares the input embedding's weight."""
        return bool(getattr(config, "tie_word_embeddings", False))

    def _tie_weights(self) -> None:
        if (
            self.lm_head is not None
            and self.model.embed_tokens is not None
            and self.ties_embeddings(self.config)
        ):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """Hidden states after the final norm (last rank), else the tensors for the next rank."""
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """lm_head over the (already selected) hidden states: [N, H] -> [N, vocab]; under
        tensor parallelism the chunks are gathered on the stage's driver (None elsewhere)."""
        logits = self.lm_head(hidden_states)
        gather = getattr(self.lm_head, "gather", None)
        return logits if gather is None else gather(logits)

    def post_materialize(self) -> None:
        """After `to_empty` from the meta device: re-tie lm_head."""
        self._tie_weights()
