"""The decoder stack a hybrid model slice shares (Bamba, Qwen3-Next, MiniMax): the embedding
on the first rank, one rotary table for its attention layers, this slice's layers built per
layer kind (the other ranks' places hold nn.Identity), the final norm on the last rank, and the
pipeline-stage forward (`pipeline.run_stage`). Each model names its own layer class, norm and
the norm's checkpoint name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from splitserve.worker.layers import RMSNorm, RotaryEmbedding, rope_parameters
from splitserve.worker.models.llama import head_dim_of
from splitserve.worker.pipeline import IntermediateTensors, run_stage

MakeLayer = Callable[[Any, int, str, RotaryEmbedding], nn.Module]
"""(config, layer index, layer kind, the shared rotary table) -> the decoder layer."""


class HybridStack(nn.Module):
    def __init__(
        self,
        config: Any,
        start_layer: int,
        end_layer: int,
        is_first: bool,
        is_last: bool,
        max_positions: int,
        kinds: list[str],
        make_layer: MakeLayer,
        *,
        rope: dict | None = None,
        norm: Callable[[int, float], nn.Module] = RMSNorm,
        norm_name: str = "norm",
    ) -> None:
        """`kinds`: every layer's kind (the model's reading of its config); `rope`: the rotary
        parameters when not `rope_parameters(config)`; `norm_name`: the final norm's
        attribute, as the checkpoint names it."""
        super().__init__()
        self.start_layer, self.end_layer = start_layer, end_layer
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size) if is_first else None
        )
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(config),
            max_positions,
            rope if rope is not None else rope_parameters(config),
            config.max_position_embeddings,
        )
        self.layers = nn.ModuleList(
            make_layer(config, i, kinds[i], self.rotary_emb)
            if start_layer <= i < end_layer
            else nn.Identity()
            for i in range(config.num_hidden_layers)
        )
        self._norm_name = norm_name
        final = norm(config.hidden_size, config.rms_norm_eps) if is_last else None
        setattr(self, norm_name, final)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        norm = getattr(self, self._norm_name)
        return run_stage(self, norm, input_ids, positions, intermediate)
