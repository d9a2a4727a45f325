"""Mamba2 (state-space duality): pre-norm blocks of a Mamba2 mixer, no attention, no positions.

Checkpoints name the stack `backbone.*` (`embeddings`, `layers.N.{norm,mixer}`, `norm_f`);
`checkpoint_renames` maps them onto the usual `model.*` layout, so the loader's layer
ownership, tying and pipeline slicing work as for the decoders. Every layer keeps a recurrent
state (`MambaMixer2.cache_spec`), so the scheduler gives each running request a state slot, and
its prefix cache keeps state snapshots at block boundaries.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from splitserve.worker.layers import RMSNorm
from splitserve.worker.mamba_mixer import MambaMixer2, check_mamba2_config
from splitserve.worker.models.causal_lm import CausalLM
from splitserve.worker.pipeline import IntermediateTensors, run_stage

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 2048
"""Context served when neither the config nor --max-model-len bounds it (vLLM's fallback)."""


class Mamba2DecoderLayer(nn.Module):
    """RMSNorm, then the mixer; the residual add is fused into the next norm."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = MambaMixer2(config, layer_idx)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.norm(hidden_states)
        else:
            hidden_states, residual = self.norm(hidden_states, residual)
        return self.mixer(hidden_states), residual


class Mamba2Model(nn.Module):
    def __init__(
        self, config: Any, start_layer: int, end_layer: int, is_first: bool, is_last: bool
    ) -> None:
        super().__init__()
        self.start_layer, self.end_layer = start_layer, end_layer
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size) if is_first else None
        )
        self.layers = nn.ModuleList(
            Mamba2DecoderLayer(config, i) if start_layer <= i < end_layer else nn.Identity()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon) if is_last else None

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return run_stage(self, self.norm, input_ids, positions, intermediate)


class Mamba2ForCausalLM(CausalLM):
    """Mamba2 for one pipeline slice; `compute_logits` exists on the last rank only."""

    checkpoint_renames = (
        (re.compile(r"^backbone\.(embeddings|embedding)\."), "model.embed_tokens."),
        (re.compile(r"^backbone\.norm_f\."), "model.norm."),
        (re.compile(r"^backbone\."), "model."),
    )
    supports_cuda_graphs: bool = False
    """Decode graphs would need the state slots as static inputs; Mamba2 decodes eagerly."""

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
        check_mamba2_config(config)
        self.config = config
        self.model = Mamba2Model(config, start_layer, end_layer, is_first, is_last)
        self._init_lm_head(config, is_last)

    @staticmethod
    def default_max_model_len(config: Any) -> int:
        """No positional limit: the context vLLM serves by default for such models."""
        return DEFAULT_MAX_MODEL_LEN
