"""MiniMax (MiniMax-Text-01 / MiniMax-M1 layout, as transformers' `MiniMaxForCausalLM`): a
hybrid decoder whose layers are lightning attention (`linear_attention`: linear attention with a
fixed per-head decay, a state per request) or softmax attention (`full_attention`: paged KV,
rotary), per the config's `layer_types`; every layer then runs a sparse MoE
(`block_sparse_moe`, Mixtral's expert names).

The layer is post-norm on its residual: the residual stream carries the *normalised* input,
scaled, h = alpha * norm(x) + beta * attn(norm(x)), then the same around the MoE. The layers
hand on (beta * out, alpha * normed) so the next norm's fused add forms h, and the final norm
(run_stage's) sees the last layer's sum.

Configs from MiniMax's own code name the layer kinds `attn_type_list` (1 softmax, 0 lightning)
and the factors `layernorm_{full_attention,linear_attention,mlp}_{alpha,beta}`; both namings
are read.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from splitserve.worker.layers import RMSNorm, RotaryEmbedding, rope_parameters
from splitserve.worker.lightning_attn import LightningAttention, check_lightning_config
from splitserve.worker.models.causal_lm import CausalLM
from splitserve.worker.models.hybrid_stack import HybridStack
from splitserve.worker.models.llama import LlamaAttention, head_dim_of
from splitserve.worker.moe import MIXTRAL_EXPERT_NAMES, SparseMoE, num_experts_of

LAYER_KINDS = ("full_attention", "linear_attention")


def layer_types(config: Any) -> list[str]:
    """Each layer's kind: `layer_types`, else MiniMax's `attn_type_list` (1 = softmax)."""
    kinds = getattr(config, "layer_types", None)
    if kinds is None and getattr(config, "attn_type_list", None) is not None:
        kinds = ["full_attention" if t else "linear_attention" for t in config.attn_type_list]
    if kinds is None:
        raise ValueError("the MiniMax config names no layer kinds (layer_types / attn_type_list)")
    kinds = list(kinds)
    if len(kinds) != config.num_hidden_layers:
        raise ValueError(
            f"layer_types has {len(kinds)} entries, but num_hidden_layers is "
            f"{config.num_hidden_layers}"
        )
    unknown = sorted(set(kinds) - set(LAYER_KINDS))
    if unknown:
        raise ValueError(
            f"unsupported MiniMax layer type(s) {unknown}; supported: {', '.join(LAYER_KINDS)}"
        )
    return kinds


def _factor(config: Any, name: str, remote_name: str) -> float:
    value = getattr(config, name, None)
    if value is None:
        value = getattr(config, remote_name, 1)
    return float(value)


def residual_factors(config: Any, kind: str) -> tuple[float, float, float, float]:
    """(attention alpha, attention beta, MLP alpha, MLP beta) of a layer of `kind`."""
    short, remote = ("full", "full_attention") if kind == "full_attention" else ("linear", "linear_attention")  # fmt: skip
    return (
        _factor(config, f"{short}_attn_alpha_factor", f"layernorm_{remote}_alpha"),
        _factor(config, f"{short}_attn_beta_factor", f"layernorm_{remote}_beta"),
        _factor(config, "mlp_alpha_factor", "layernorm_mlp_alpha"),
        _factor(config, "mlp_beta_factor", "layernorm_mlp_beta"),
    )


def minimax_rope_parameters(config: Any) -> dict[str, Any]:
    """The softmax layers' rope: over `rotary_dim` dims where MiniMax's own config names it,
    else over the whole head (transformers' MiniMax rotates every dim, whatever
    partial_rotary_factor says)."""
    params = rope_parameters(config)
    params.pop("partial_rotary_factor", None)
    rotary_dim = getattr(config, "rotary_dim", None)
    head_dim = head_dim_of(config)
    if rotary_dim is not None and rotary_dim != head_dim:
        if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            raise ValueError(
                f"rotary_dim {rotary_dim} must be even and in (0, head_dim {head_dim}]"
            )
        params["partial_rotary_factor"] = rotary_dim / head_dim
    return params


def check_minimax_config(config: Any) -> None:
    """ValueError naming the first config field this model cannot serve."""
    kinds = layer_types(config)
    if "linear_attention" in kinds:
        check_lightning_config(config)
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(
            f"sliding_window {config.sliding_window} is not supported for MiniMax; set it to null"
        )
    if getattr(config, "shared_intermediate_size", 0):
        raise ValueError("MiniMax shared experts (shared_intermediate_size > 0) are not supported")
    if getattr(config, "postnorm", True) is False:
        raise ValueError("MiniMax with postnorm false is not supported")


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if factor == 1.0 else x * factor


class MiniMaxDecoderLayer(nn.Module):
    def __init__(
        self, config: Any, layer_idx: int, layer_type: str, rotary_emb: RotaryEmbedding
    ) -> None:
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "full_attention":
            self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, False, False)
        else:
            self.self_attn = LightningAttention(config, layer_idx)
        self.attn_alpha, self.attn_beta, self.mlp_alpha, self.mlp_beta = residual_factors(
            config, layer_type
        )
        self.block_sparse_moe = SparseMoE(
            config.hidden_size,
            num_experts_of(config),
            config.num_experts_per_tok,
            config.intermediate_size,
            renormalize=True,
            names=MIXTRAL_EXPERT_NAMES,
            hidden_act=getattr(config, "hidden_act", "silu"),
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            normed = self.input_layernorm(hidden_states)
        else:
            normed, _ = self.input_layernorm(hidden_states, residual)
        if self.layer_type == "full_attention":
            attn = self.self_attn(positions, normed)
        else:
            attn = self.self_attn(normed)
        normed, _ = self.post_attention_layernorm(
            _scaled(attn, self.attn_beta), _scaled(normed, self.attn_alpha)
        )
        out = self.block_sparse_moe(normed)
        return _scaled(out, self.mlp_beta), _scaled(normed, self.mlp_alpha)


class MiniMaxModel(HybridStack):
    def __init__(
        self,
        config: Any,
        start_layer: int,
        end_layer: int,
        is_first: bool,
        is_last: bool,
        max_positions: int,
    ) -> None:
        super().__init__(
            config, start_layer, end_layer, is_first, is_last, max_positions,
            layer_types(config), MiniMaxDecoderLayer, rope=minimax_rope_parameters(config),
        )  # fmt: skip


class MiniMaxForCausalLM(CausalLM):
    """MiniMax for one pipeline slice."""

    packed_modules: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }
    checkpoint_ignore = re.compile(r"self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")
    """Decay tables transformers saves with the weights; the layer computes them itself."""
    supports_cuda_graphs: bool = False
    """The lightning layers' state slots are not static graph inputs: decodes run eagerly."""

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
        check_minimax_config(config)
        self.config = config
        self.model = MiniMaxModel(config, start_layer, end_layer, is_first, is_last, max_positions)
        self._init_lm_head(config, is_last)

    def post_materialize(self) -> None:
        self.model.rotary_emb.init_cache()
        for module in self.model.modules():
            if isinstance(module, LightningAttention):
                module.init_slopes()
        self._tie_weights()
