"""gpt-oss: Llama-shaped attention with learned sinks, and a biased MoE with a clamped SwiGLU.

Attention: q/k/v/o carry biases; each head has a learned sink logit (`self_attn.sinks`), an
extra softmax entry with no value; layers alternate sliding-window and full attention as
`config.layer_types` says (read per layer by `sliding_window_of`); rotary is YaRN from
`rope_parameters`. MLP: a router with a bias picks the top-k experts by logit and softmaxes
those k logits (not all E); each expert is gate_up -> clamped SwiGLU -> down, both with biases
(`swiglu_alpha`, `swiglu_limit` from the config).

The checkpoint stores the experts stacked and transposed, gate and up interleaved by column:
`experts.gate_up_proj` [E, H, 2I] (column 2i is gate i, 2i + 1 is up i), `gate_up_proj_bias`
[E, 2I], `down_proj` [E, I, H], `down_proj_bias` [E, H]. The loader turns them into the
layout every MoE here uses: [E, 2I, H] with the gate rows, then the up rows, and [E, H, I].
MXFP4 checkpoints (`*_blocks`, `*_scales`) load through the mxfp4 quant method
(worker/quantization/mxfp4.py), whose rows are interleaved the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitserve.kernels import dispatch
from splitserve.worker.layers import RotaryEmbedding
from splitserve.worker.linear import default_weight_loader, set_weight_attrs
from splitserve.worker.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
)
from splitserve.worker.moe import MoEExperts, MoEExpertsMethod, num_experts_of

GPT_OSS_EXPERT_NAMES = {"gate_up_proj": ("gate_up_proj", None), "down_proj": ("down_proj", None)}
"""gpt-oss checkpoints hold stacked experts only (no per-expert tensors)."""


def deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """Axis 1 [g0, u0, g1, u1, ...] -> [g0, g1, ..., u0, u1, ...] (a copy)."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


class GptOssExperts(MoEExperts):
    """Stacked experts with biases and the clamped SwiGLU; loads the checkpoint's transposed,
    interleaved stacks (or an MXFP4 method's blocks and scales)."""

    interleaved_gate_up = True
    """Checkpoint gate_up rows alternate gate / up (quant methods de-interleave on load)."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, alpha: float, limit: float
    ) -> None:
        super().__init__(num_experts, hidden_size, intermediate_size, GPT_OSS_EXPERT_NAMES)
        self.swiglu_alpha = alpha
        self.swiglu_limit = limit
        self._create_biases()

    def _create_biases(self) -> None:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.empty(e, h), requires_grad=False)
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            set_weight_attrs(self, name, weight_loader=self.bias_loader)

    def set_method(self, method: MoEExpertsMethod) -> None:
        super().set_method(method)
        self._create_biases()  # biases stay in the compute dtype whatever the method

    def bias_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        """gate_up_proj_bias [E, 2I] arrives interleaved; down_proj_bias [E, H] as is."""
        # NOTE: by identity, not shape: H may equal 2I
        if param is self._parameters.get("gate_up_proj_bias") and loaded.dim() == 2:
            loaded = deinterleave_rows(loaded)
        default_weight_loader(param, loaded, shard_id)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        """The checkpoint's [E, H, 2I] (interleaved) / [E, I, H] stacks -> [E, 2I, H] / [E, H, I]."""
        if shard_id is not None or loaded.dim() != 3:
            super().weight_loader(param, loaded, shard_id)
            return
        loaded = loaded.transpose(1, 2)
        if param is self._parameters.get("gate_up_proj"):  # by identity: H may equal 2I
            loaded = deinterleave_rows(loaded)
        default_weight_loader(param, loaded)

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        apply = getattr(self.method, "apply", None)
        if apply is not None:
            return apply(self, x, topk_weights, topk_ids)
        return dispatch.fused_moe(
            x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids,
            b13=self.gate_up_proj_bias, b2=self.down_proj_bias,
            swiglu_limit=self.swiglu_limit, swiglu_alpha=self.swiglu_alpha,
        )  # fmt: skip


class GptOssMoE(nn.Module):
    """Router (with bias) -> top-k logits -> softmax over those k -> experts."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        num_experts = num_experts_of(config)
        self.top_k = config.num_experts_per_tok
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, {num_experts}] (the expert count), "
                f"got {self.top_k}"
            )
        self.router = nn.Linear(config.hidden_size, num_experts, bias=True)
        self.experts = GptOssExperts(
            num_experts,
            config.hidden_size,
            config.intermediate_size,
            float(getattr(config, "swiglu_alpha", 1.702)),
            float(getattr(config, "swiglu_limit", 7.0)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        logits, ids = torch.topk(self.router(x), self.top_k, dim=-1)
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
        return self.experts(x, weights, ids)


class GptOssAttention(LlamaAttention):
    """Llama attention (biased q/k/v/o) plus one learned sink logit per query head."""

    def __init__(
        self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool, o_bias: bool
    ) -> None:
        super().__init__(config, layer_idx, rotary_emb, qkv_bias, o_bias)
        self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(self.qkv_proj(hidden_states))
        q, k = self.rotary_emb(positions, q, k)  # in place, in qkv
        return self.o_proj(self.attn(q, k, v, sinks=self.sinks.float()))


class GptOssDecoderLayer(LlamaDecoderLayer):
    attention_cls = GptOssAttention

    def make_mlp(self, config: Any, layer_idx: int, bias: bool) -> nn.Module:
        return GptOssMoE(config)


class GptOssModel(LlamaModel):
    decoder_layer_cls = GptOssDecoderLayer


class GptOssForCausalLM(LlamaForCausalLM):
    """gpt-oss for one pipeline slice."""

    model_cls = GptOssModel
    # NOTE: the Triton MoE path has no host sync, but capture is untested on a GPU yet.
    supports_cuda_graphs = False
    supports_tensor_parallel = False  # NOTE: its sinks and experts are not sharded yet
