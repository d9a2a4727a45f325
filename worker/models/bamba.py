"""Bamba: a hybrid decoder. Most layers mix with Mamba2 (`mamba`), the layers in
`attn_layer_indices` with Llama-style attention (`self_attn`, rotary on half of each head);
every layer then runs a SwiGLU feed-forward (`feed_forward`).

Each kind of layer declares its own cache (paged KV blocks for attention, a recurrent state per
request for the mixers), so a running request holds blocks and one state slot. Module names
mirror the checkpoint; the Mamba config fields (`mamba_n_heads`, `mamba_d_state`, ...) are
read through `mamba_config`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from splitserve.worker.layers import RMSNorm, RotaryEmbedding
from splitserve.worker.mamba_mixer import MambaMixer2, check_mamba2_config
from splitserve.worker.models.causal_lm import CausalLM
from splitserve.worker.models.hybrid_stack import HybridStack
from splitserve.worker.models.llama import LlamaAttention, LlamaMLP


def mamba_config(config: Any) -> SimpleNamespace:
    """The mixer's fields under their Mamba2Config names."""
    return SimpleNamespace(
        hidden_size=config.hidden_size,
        num_heads=config.mamba_n_heads,
        head_dim=config.mamba_d_head,
        state_size=config.mamba_d_state,
        n_groups=config.mamba_n_groups,
        chunk_size=config.mamba_chunk_size,
        conv_kernel=config.mamba_d_conv,
        expand=config.mamba_expand,
        use_bias=config.mamba_proj_bias,
        use_conv_bias=config.mamba_conv_bias,
        hidden_act=config.hidden_act,
        layer_norm_epsilon=config.rms_norm_eps,
        time_step_limit=config.time_step_limit or (0.0, float("inf")),
    )


def layer_types(config: Any) -> list[str]:
    attn = set(getattr(config, "attn_layer_indices", None) or [])
    return [
        "full_attention" if i in attn else "linear_attention"
        for i in range(config.num_hidden_layers)
    ]


class BambaDecoderLayer(nn.Module):
    def __init__(
        self, config: Any, layer_idx: int, layer_type: str, rotary_emb: RotaryEmbedding
    ) -> None:
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "full_attention":
            bias = bool(getattr(config, "attention_bias", False))
            self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, bias, bias)
        else:
            self.mamba = MambaMixer2(mamba_config(config), layer_idx)
        self.feed_forward = LlamaMLP(config, bool(getattr(config, "mlp_bias", False)))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if self.layer_type == "full_attention":
            hidden_states = self.self_attn(positions, hidden_states)
        else:
            hidden_states = self.mamba(hidden_states)
        hidden_states, residual = self.pre_ff_layernorm(hidden_states, residual)
        return self.feed_forward(hidden_states), residual


class BambaModel(HybridStack):
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
            layer_types(config), BambaDecoderLayer, norm_name="final_layernorm",
        )  # fmt: skip


class BambaForCausalLM(CausalLM):
    packed_modules: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }
    supports_cuda_graphs: bool = False
    """The mixers' state slots are not static graph inputs: decodes run eagerly."""

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
        check_mamba2_config(mamba_config(config))
        self.config = config
        self.model = BambaModel(config, start_layer, end_layer, is_first, is_last, max_positions)
        self._init_lm_head(config, is_last)

    def post_materialize(self) -> None:
        self.model.rotary_emb.init_cache()
        self._tie_weights()
