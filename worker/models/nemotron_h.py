"""NemotronH: a hybrid stack where each block is one RMSNorm and one mixer: Mamba2
("linear_attention"), attention without positional rotation ("full_attention"), or a plain MLP
with squared ReLU ("mlp"), as `layers_block_type` (from `hybrid_override_pattern` in real
checkpoints) says. Mixture-of-experts blocks are refused.

Checkpoint names: `model.` (or the older `backbone.`) `embeddings`, `layers.N.{norm,mixer}`,
`norm_f`; `checkpoint_renames` maps them onto the usual layout.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from splitserve.worker.attention import Attention
from splitserve.worker.layers import RMSNorm
from splitserve.worker.linear import Linear, QKVLinear
from splitserve.worker.mamba_mixer import MambaMixer2, check_mamba2_config
from splitserve.worker.models.causal_lm import CausalLM
from splitserve.worker.models.llama import sliding_window_of
from splitserve.worker.pipeline import IntermediateTensors, run_stage

BLOCK_TYPES = ("linear_attention", "full_attention", "mlp")


def block_types(config: Any) -> list[str]:
    """Each layer's block type; ValueError naming `layers_block_type` for one not served."""
    kinds = list(getattr(config, "layers_block_type", None) or [])
    bad = sorted({k for k in kinds if k not in BLOCK_TYPES})
    if bad or not kinds:
        raise ValueError(
            f"unsupported layers_block_type entries {bad or kinds!r} in the NemotronH config; "
            f"supported: {', '.join(BLOCK_TYPES)} (hybrid_override_pattern M, *, -)"
        )
    return kinds


def mamba_config(config: Any) -> SimpleNamespace:
    """The mixer's fields under their Mamba2Config names."""
    inner = config.mamba_num_heads * config.mamba_head_dim
    return SimpleNamespace(
        hidden_size=config.hidden_size,
        num_heads=config.mamba_num_heads,
        head_dim=config.mamba_head_dim,
        state_size=config.ssm_state_size,
        n_groups=config.n_groups,
        chunk_size=config.chunk_size,
        conv_kernel=config.conv_kernel,
        expand=inner / config.hidden_size,
        use_bias=config.use_bias,
        use_conv_bias=config.use_conv_bias,
        hidden_act=config.mamba_hidden_act,
        layer_norm_epsilon=config.layer_norm_epsilon,
        time_step_limit=getattr(config, "time_step_limit", None) or (0.0, float("inf")),
    )


class NemotronHAttention(nn.Module):
    """Attention with no positional rotation: fused qkv, paged attention, o_proj."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVLinear(
            config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, bias=bias
        )
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            layer_idx,
            sliding_window_of(config, layer_idx) if config.sliding_window else None,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(hidden_states)
        n = qkv.shape[0]
        q = qkv[:, :q_size].view(n, self.num_heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(n, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(n, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v))


class NemotronHMLP(nn.Module):
    """up_proj, squared ReLU, down_proj."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        act = getattr(config, "mlp_hidden_act", "relu2")
        if act != "relu2":
            raise ValueError(
                f"unsupported mlp_hidden_act {act!r} in the NemotronH config; supported: relu2"
            )
        bias = bool(getattr(config, "mlp_bias", False))
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


class NemotronHBlock(nn.Module):
    def __init__(self, config: Any, layer_idx: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if kind == "linear_attention":
            self.mixer = MambaMixer2(mamba_config(config), layer_idx)
        elif kind == "full_attention":
            self.mixer = NemotronHAttention(config, layer_idx)
        else:
            self.mixer = NemotronHMLP(config)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.norm(hidden_states)
        else:
            hidden_states, residual = self.norm(hidden_states, residual)
        return self.mixer(hidden_states), residual


class NemotronHModel(nn.Module):
    def __init__(
        self, config: Any, start_layer: int, end_layer: int, is_first: bool, is_last: bool
    ) -> None:
        super().__init__()
        self.start_layer, self.end_layer = start_layer, end_layer
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size) if is_first else None
        )
        kinds = block_types(config)
        self.layers = nn.ModuleList(
            NemotronHBlock(config, i, kinds[i]) if start_layer <= i < end_layer else nn.Identity()
            for i in range(len(kinds))
        )
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon) if is_last else None

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return run_stage(self, self.norm, input_ids, positions, intermediate)


class NemotronHForCausalLM(CausalLM):
    packed_modules: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }
    checkpoint_renames = (
        (re.compile(r"^(backbone|model)\.(embeddings|embedding)\."), "model.embed_tokens."),
        (re.compile(r"^(backbone|model)\.norm_f\."), "model.norm."),
        (re.compile(r"^backbone\."), "model."),
    )
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
        if "linear_attention" in block_types(config):
            check_mamba2_config(mamba_config(config))
        self.config = config
        self.model = NemotronHModel(config, start_layer, end_layer, is_first, is_last)
        self._init_lm_head(config, is_last)
