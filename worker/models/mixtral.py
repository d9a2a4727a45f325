"""Mixtral: Mistral attention, and a sparse MoE in place of every MLP.

The router's top-k weights are renormalised to sum to one. The checkpoint keeps the MoE under
`block_sparse_moe` with experts `w1` (gate), `w3` (up), `w2` (down); the model names it `mlp`
with stacked experts, as transformers does in memory (see worker/moe.py), and the loader
renames (`checkpoint_renames`).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from splitserve.worker.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from splitserve.worker.moe import MIXTRAL_EXPERT_NAMES, SparseMoE, num_experts_of


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: Any, layer_idx: int, bias: bool) -> nn.Module:
        return SparseMoE(
            config.hidden_size,
            num_experts_of(config),
            config.num_experts_per_tok,
            config.intermediate_size,
            renormalize=True,
            names=MIXTRAL_EXPERT_NAMES,
            hidden_act=getattr(config, "hidden_act", "silu"),
        )


class MixtralModel(LlamaModel):
    decoder_layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral for one pipeline slice."""

    model_cls = MixtralModel
    # NOTE: the Triton MoE path has no host sync, but capture is untested on a GPU yet.
    supports_cuda_graphs = False
    checkpoint_renames = ((re.compile(r"\.block_sparse_moe\."), ".mlp."),)
    """(pattern, replacement) applied to each checkpoint tensor name before it is placed."""
