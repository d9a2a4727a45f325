"""Qwen3-MoE: Qwen3 attention (q/k norms), and a sparse MoE MLP in most layers.

A layer is sparse unless it is listed in `mlp_only_layers` or `(layer + 1)` is not a multiple
of `decoder_sparse_step`; the others keep a dense MLP of `intermediate_size`. Experts have
`moe_intermediate_size`; the router's top-k weights are renormalised only when
`norm_topk_prob` is set. No shared expert (that is Qwen2-MoE).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from splitserve.worker.models.llama import LlamaMLP
from splitserve.worker.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model
from splitserve.worker.moe import QWEN_EXPERT_NAMES, SparseMoE, num_experts_of


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Whether layer `layer_idx` has the MoE MLP (transformers' rule)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and num_experts_of(config) > 0
        and (layer_idx + 1) % step == 0
    )


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, config: Any, layer_idx: int, bias: bool) -> nn.Module:
        if not is_sparse_layer(config, layer_idx):
            return LlamaMLP(config, bias)
        return SparseMoE(
            config.hidden_size,
            num_experts_of(config),
            config.num_experts_per_tok,
            config.moe_intermediate_size,
            renormalize=bool(getattr(config, "norm_topk_prob", False)),
            names=QWEN_EXPERT_NAMES,
            hidden_act=getattr(config, "hidden_act", "silu"),
        )


class Qwen3MoeModel(Qwen3Model):
    decoder_layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE for one pipeline slice."""

    model_cls = Qwen3MoeModel
    # NOTE: the Triton MoE path has no host sync, but capture is untested on a GPU yet.
    supports_cuda_graphs = False
