"""Llama (and Mistral): module and parameter names mirror the Hugging Face checkpoint.

q/k/v and gate/up are fused (`qkv_proj`, `gate_up_proj`); `packed_modules` tells the loader how
the checkpoint's separate tensors pack into them. The model is built for one pipeline slice
[start_layer, end_layer): the first rank owns `model.embed_tokens`, the last `model.norm` and
`lm_head`; layers outside the slice are parameterless placeholders so names keep their indices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitserve.worker import parallel_state
from splitserve.worker.attention import Attention
from splitserve.worker.layers import RMSNorm, RotaryEmbedding, SiluAndMul, rope_parameters
from splitserve.worker.linear import GateUpLinear, QKVLinear, local_heads
from splitserve.worker.models.causal_lm import CausalLM
from splitserve.worker.parallel_layers import row_parallel_linear, vocab_embedding
from splitserve.worker.pipeline import IntermediateTensors, run_stage


def head_dim_of(config: Any) -> int:
    """The config's head_dim when present, else hidden_size // num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: Any, layer_idx: int) -> int | None:
    """The layer's sliding window, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, rotary, paged attention, output projection."""

    def __init__(
        self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool, o_bias: bool
    ) -> None:
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVLinear(config.hidden_size, heads, kv_heads, self.head_dim, qkv_bias)
        # This tensor-parallel rank's heads (all of them on one rank).
        state = parallel_state.current()
        (_, self.num_heads), (_, self.num_kv_heads) = local_heads(
            heads, kv_heads, state.tp_rank, state.tp_size
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = row_parallel_linear(heads * self.head_dim, config.hidden_size, o_bias)
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            layer_idx,
            sliding_window_of(config, layer_idx),
        )

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the fused projection's output: q [T, Hq, D], k and v [T, Hk, D]."""
        num_tokens, d = qkv.shape[0], self.head_dim
        qk_end = self.q_size + self.kv_size
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, d)
        k = qkv[:, self.q_size : qk_end].view(num_tokens, self.num_kv_heads, d)
        v = qkv[:, qk_end:].view(num_tokens, self.num_kv_heads, d)
        return q, k, v

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(self.qkv_proj(hidden_states))
        q, k = self.rotary_emb(positions, q, k)  # in place, in qkv
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    """SwiGLU MLP over a fused gate_up projection."""

    def __init__(self, config: Any, bias: bool) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; supported: silu")
        self.gate_up_proj = GateUpLinear(config.hidden_size, config.intermediate_size, bias)
        self.down_proj = row_parallel_linear(config.intermediate_size, config.hidden_size, bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer; the residual add is fused into the next norm.

    Variants swap `attention_cls`, or override `make_mlp` (MoE models pick a sparse MLP per
    layer), and keep the rest.
    """

    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        mlp_bias: bool,
    ) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_idx, rotary_emb, qkv_bias, o_bias)
        self.mlp = self.make_mlp(config, layer_idx, mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, config: Any, layer_idx: int, bias: bool) -> nn.Module:
        """The layer's feed-forward block: the dense SwiGLU MLP."""
        return LlamaMLP(config, bias)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    """Embedding, this rank's decoder layers, and the final norm."""

    decoder_layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(
        self,
        config: Any,
        start_layer: int,
        end_layer: int,
        is_first: bool,
        is_last: bool,
        max_positions: int,
        qkv_bias: bool,
        o_bias: bool,
        mlp_bias: bool,
    ) -> None:
        super().__init__()
        self.start_layer, self.end_layer = start_layer, end_layer
        self.embed_tokens = (
            vocab_embedding(config.vocab_size, config.hidden_size) if is_first else None
        )
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(config),
            max_positions,
            rope_parameters(config),
            config.max_position_embeddings,
        )
        self.layers = nn.ModuleList(
            self.decoder_layer_cls(config, i, self.rotary_emb, qkv_bias, o_bias, mlp_bias)
            if start_layer <= i < end_layer
            else nn.Identity()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if is_last else None

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return run_stage(self, self.norm, input_ids, positions, intermediate)


class LlamaForCausalLM(CausalLM):
    """Llama / Mistral for one pipeline slice; `compute_logits` exists on the last rank only."""

    packed_modules: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }
    """Checkpoint module name -> (fused module name, shard id)."""

    model_cls: type[LlamaModel] = LlamaModel
    supports_cuda_graphs: bool = True
    """Whether a decode step can be captured (no host syncs or data-dependent shapes)."""

    takes_parallel_state: bool = True
    """Constructed as (config, ParallelState, max_positions) (the older positional stage
    arguments still work: `parallel_state.stage_arguments`)."""
    supports_tensor_parallel: bool = True
    """Whether --tensor-parallel-size > 1 can shard it (heads, MLP, experts, vocabulary)."""

    def __init__(self, config: Any, parallel: parallel_state.ParallelState | int, *args) -> None:
        super().__init__()
        state, max_positions = parallel_state.stage_arguments(parallel, args)
        self.config = config
        self.parallel = state
        qkv_bias, o_bias, mlp_bias = self.biases(config)
        with parallel_state.use(state):
            self.model = self.model_cls(
                config,
                state.start_layer,
                state.end_layer,
                state.is_first,
                state.is_last,
                max_positions,
                qkv_bias,
                o_bias,
                mlp_bias,
            )
            self._init_lm_head(config, state.is_last)

    @staticmethod
    def biases(config: Any) -> tuple[bool, bool, bool]:
        """(qkv, o_proj, mlp) bias flags."""
        attention_bias = bool(getattr(config, "attention_bias", False))
        return attention_bias, attention_bias, bool(getattr(config, "mlp_bias", False))

    def post_materialize(self) -> None:
        """After `to_empty` from the meta device: rebuild the rotary cache, re-tie lm_head."""
        self.model.rotary_emb.init_cache()
        self._tie_weights()


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama with an optional sliding window (read per layer from the config)."""
