"""Qwen3-Next: a hybrid decoder. Layers whose `layer_types` entry is "linear_attention" mix with
a gated delta net (`linear_attn`, worker/gdn_mixer.py); the "full_attention" ones with softmax
attention whose output is gated per channel by sigmoid(gate), the gate coming out of q_proj
beside each head's query (`self_attn`, q/k RMSNorm, rotary on a part of each head). The MLP is
a sparse MoE with a shared expert scaled by sigmoid(shared_expert_gate(x)) (`mlp`), or a dense
SwiGLU in `mlp_only_layers`.

Every RMSNorm outside the mixer scales by (1 + weight) (zero-centred weights, as Gemma); the
loader adds the one when it copies the weight in, so the layers run the usual RMSNorm kernels.
Each kind of layer declares its own cache (paged KV blocks for attention, a conv and recurrent
state per request for the mixers), so a running request holds blocks and one state slot.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from splitserve.worker.attention import Attention
from splitserve.worker.gdn_mixer import GatedDeltaNet, check_gdn_config
from splitserve.worker.layers import RMSNorm, RotaryEmbedding
from splitserve.worker.linear import Linear, default_weight_loader, set_weight_attrs
from splitserve.worker.models.causal_lm import CausalLM
from splitserve.worker.models.hybrid_stack import HybridStack
from splitserve.worker.models.llama import LlamaMLP, head_dim_of
from splitserve.worker.models.qwen3_moe import is_sparse_layer
from splitserve.worker.moe import QWEN_EXPERT_NAMES, SparseMoE, num_experts_of

LAYER_TYPES = ("linear_attention", "full_attention")


def layer_types(config: Any) -> list[str]:
    """Each layer's mixer; ValueError for a kind this model lacks."""
    kinds = list(config.layer_types)
    if len(kinds) < config.num_hidden_layers:
        raise ValueError(
            f"layer_types lists {len(kinds)} layers, the config has {config.num_hidden_layers}"
        )
    for i, kind in enumerate(kinds[: config.num_hidden_layers]):
        if kind not in LAYER_TYPES:
            raise ValueError(f"layer_types[{i}] is {kind!r}; supported: {', '.join(LAYER_TYPES)}")
    return kinds


def _offset_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """The checkpoint stores w for a (1 + w) scale: keep 1 + w."""
    default_weight_loader(param, loaded.float().add(1.0).to(loaded.dtype), shard_id)


class OffsetRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint weight is zero-centred: it holds 1 + w once loaded."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        set_weight_attrs(self, "weight", weight_loader=_offset_loader)


class Qwen3NextAttention(nn.Module):
    """Attention with an output gate: q_proj gives each head's query and its gate side by side
    ([T, H, 2D]); the attention output is scaled by sigmoid(gate) before o_proj."""

    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        bias = bool(getattr(config, "attention_bias", False))
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, 2 * self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = OffsetRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = OffsetRMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, layer_idx
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens, d = hidden_states.shape[0], self.head_dim
        q, gate = self.q_proj(hidden_states).view(tokens, self.num_heads, 2 * d).split(d, -1)
        k = self.k_proj(hidden_states).view(tokens, self.num_kv_heads, d)
        v = self.v_proj(hidden_states).view(tokens, self.num_kv_heads, d)
        # The norms return fresh tensors; rotary then rotates those in place.
        q, k = self.rotary_emb(positions, self.q_norm(q.contiguous()), self.k_norm(k))
        out = self.attn(q, k, v) * torch.sigmoid(gate.reshape(tokens, -1))
        return self.o_proj(out)


class Qwen3NextSparseMoE(SparseMoE):
    """The routed experts plus a shared expert, scaled per token by sigmoid(shared_expert_gate)."""

    def __init__(self, config: Any) -> None:
        super().__init__(
            config.hidden_size,
            num_experts_of(config),
            config.num_experts_per_tok,
            config.moe_intermediate_size,
            renormalize=bool(getattr(config, "norm_topk_prob", True)),
            names=QWEN_EXPERT_NAMES,
            hidden_act=getattr(config, "hidden_act", "silu"),
        )
        shared = SimpleNamespace(
            hidden_size=config.hidden_size,
            intermediate_size=config.shared_expert_intermediate_size,
            hidden_act=getattr(config, "hidden_act", "silu"),
        )
        self.shared_expert = LlamaMLP(shared, bias=False)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_expert(x) * torch.sigmoid(self.shared_expert_gate(x))
        return super().forward(x) + shared


class Qwen3NextDecoderLayer(nn.Module):
    def __init__(
        self, config: Any, layer_idx: int, layer_type: str, rotary_emb: RotaryEmbedding
    ) -> None:
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "full_attention":
            self.self_attn = Qwen3NextAttention(config, layer_idx, rotary_emb)
        else:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        if is_sparse_layer(config, layer_idx):
            self.mlp = Qwen3NextSparseMoE(config)
        else:
            self.mlp = LlamaMLP(config, bias=False)
        self.input_layernorm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)

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
            hidden_states = self.linear_attn(hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Qwen3NextModel(HybridStack):
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
            layer_types(config), Qwen3NextDecoderLayer, norm=OffsetRMSNorm,
        )  # fmt: skip


class Qwen3NextForCausalLM(CausalLM):
    """Qwen3-Next for one pipeline slice; `compute_logits` exists on the last rank only."""

    packed_modules: dict[str, tuple[str, str]] = {
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }
    supports_cuda_graphs: bool = False
    """The mixers' state slots are not static graph inputs: decodes run eagerly."""
    checkpoint_ignore = re.compile(r"^mtp\.")
    """The released checkpoints' multi-token-prediction layer (for speculative decoding, which
    splitserve does not run): read past without a warning per tensor."""

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
        check_gdn_config(config)
        self.config = config
        self.model = Qwen3NextModel(
            config, start_layer, end_layer, is_first, is_last, max_positions
        )
        self._init_lm_head(config, is_last)

    def post_materialize(self) -> None:
        self.model.rotary_emb.init_cache()
        self._tie_weights()
