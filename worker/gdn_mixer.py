"""The gated delta net mixer of Qwen3-Next (`linear_attn`): one fused projection to q, k, v and
the output gate z (`in_proj_qkvz`), one to the write strength b and decay input a
(`in_proj_ba`), a depthwise causal conv (SiLU) over [q | k | v], L2-normalised q and k, the
gated delta rule with per-head decay g = -exp(A_log) softplus(a + dt_bias) and beta =
sigmoid(b), then a per-head RMSNorm gated by silu(z), and `out_proj`.

Parameter names mirror Hugging Face's `Qwen3NextGatedDeltaNet`, so checkpoints load by name;
the fused projections keep the checkpoint's layout (grouped per key head: q, k, then the value
heads' v and z), which `_split_projections` unpacks. Per request the mixer keeps a conv state
[conv_dim, K - 1] and a recurrent state [Hv, Dk, Dv] in the scheduler's state slots, split per
step as the Mamba2 mixer does (`mamba_mixer.step_plan`): a leading run of one-token decodes
(one fused recurrent step each, batched over slots), then the prefill chunks (the chunked rule,
continuing from the slot's state when the chunk continues a prompt).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import dispatch
from splitserve.worker.attention import current_metadata
from splitserve.worker.cache_spec import RecurrentStateSpec
from splitserve.worker.linear import Linear
from splitserve.worker.mamba_mixer import MambaConv1d, step_plan

SUPPORTED_ACTIVATIONS = ("silu", "swish")


def check_gdn_config(config: Any) -> None:
    """ValueError naming the first config field the mixer cannot serve."""
    act = getattr(config, "hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden_act {act!r} for the gated delta net; supported: "
            f"{', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    if hk < 1 or hv % hk:
        raise ValueError(
            f"linear_num_value_heads ({hv}) must be a multiple of linear_num_key_heads ({hk})"
        )
    if config.linear_conv_kernel_dim < 2:
        raise ValueError(
            f"linear_conv_kernel_dim must be at least 2, got {config.linear_conv_kernel_dim}"
        )
    if config.linear_key_head_dim > 256:
        raise ValueError(
            f"linear_key_head_dim above 256 is not supported, got {config.linear_key_head_dim}"
        )


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's features, times the weight, times silu(gate)."""

    def __init__(self, head_dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x and gate [..., head_dim] -> [..., head_dim] in x's dtype."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = self.weight * h.to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        check_gdn_config(config)
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_kernel = config.linear_conv_kernel_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = Linear(
            config.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False
        )
        self.in_proj_ba = Linear(config.hidden_size, 2 * self.num_v_heads, bias=False)
        self.conv1d = MambaConv1d(self.conv_dim, self.conv_kernel, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, config.hidden_size, bias=False)
        self.state_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        """(conv [slots, conv_dim, K - 1], recurrent [slots, Hv, Dk, Dv]), bound by StateCache."""

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> RecurrentStateSpec:
        return RecurrentStateSpec(
            self.layer_idx,
            (self.conv_dim, self.conv_kernel - 1),
            (self.num_v_heads, self.head_k_dim, self.head_v_dim),
            dtype,
        )

    def _split_projections(
        self, qkvz: torch.Tensor, ba: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The checkpoint's per-key-head groups -> mixed [q | k | v] [T, conv_dim],
        z [T, Hv, Dv], b and a [T, Hv]."""
        tokens = qkvz.shape[0]
        rep = self.num_v_heads // self.num_k_heads
        dk, vdim = self.head_k_dim, rep * self.head_v_dim
        q, k, v, z = qkvz.view(tokens, self.num_k_heads, -1).split([dk, dk, vdim, vdim], dim=-1)
        b, a = ba.view(tokens, self.num_k_heads, 2 * rep).split([rep, rep], dim=-1)
        mixed = torch.cat(
            [q.reshape(tokens, -1), k.reshape(tokens, -1), v.reshape(tokens, -1)], dim=-1
        )
        z = z.reshape(tokens, self.num_v_heads, self.head_v_dim)
        return mixed, z, b.reshape(tokens, -1), a.reshape(tokens, -1)

    def _split_conv(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv output [T, conv_dim] -> q and k [T, Hk, Dk], v [T, Hv, Dv] (views)."""
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        shape_k = (-1, self.num_k_heads, self.head_k_dim)
        return q.view(shape_k), k.view(shape_k), v.view(-1, self.num_v_heads, self.head_v_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, hidden] of the step's packed sequences -> [T, hidden]."""
        meta = current_metadata()
        plan = step_plan(meta)
        cache = self.state_cache if meta.state_slots is not None else None
        mixed, z, b, a = self._split_projections(
            self.in_proj_qkvz(hidden_states), self.in_proj_ba(hidden_states)
        )
        beta = torch.sigmoid(b.float())
        g = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())
        weight = self.conv1d.weight[:, 0, :]
        out = torch.empty(
            hidden_states.shape[0],
            self.num_v_heads,
            self.head_v_dim,
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        nd, ndt = plan.num_decodes, plan.num_decode_tokens
        if nd:
            conv_states, rec_states = cache
            if plan.fresh_decode_slots is not None:
                conv_states.index_fill_(0, plan.fresh_decode_slots, 0)
                rec_states.index_fill_(0, plan.fresh_decode_slots, 0)
            conv_d = dispatch.causal_conv1d_update(
                mixed[:ndt], weight, None, conv_states, plan.decode_slots
            )
            q, k, v = self._split_conv(conv_d)
            out[:ndt] = dispatch.fused_recurrent_gated_delta_rule(
                q, k, v, g[:ndt], beta[:ndt], rec_states, plan.decode_slots
            )
        if ndt < hidden_states.shape[0]:
            conv_p = dispatch.causal_conv1d_prefill(
                mixed[ndt:],
                weight,
                None,
                cache[0] if cache is not None else None,
                plan.prefill_cu,
                plan.prefill_slots,
                plan.prefill_has_initial,
            )
            q, k, v = self._split_conv(conv_p)
            out[ndt:] = dispatch.chunk_gated_delta_rule(
                q,
                k,
                v,
                g[ndt:].contiguous(),
                beta[ndt:].contiguous(),
                cache[1] if cache is not None else None,
                plan.prefill_cu,
                plan.prefill_slots,
                plan.prefill_has_initial,
            )
        out = self.norm(out, z)
        return self.out_proj(out.view(-1, self.value_dim))
