"""MiniMax's lightning attention layer: linear attention with a fixed per-head exponential decay,
its running state (the decayed sum of k^T v, [heads, head_dim, head_dim]) kept per request in
the state slots.

Parameter names mirror the checkpoint (`qkv_proj`, `output_gate`, `norm`, `out_proj`). The
projection is activated (SiLU) and laid out per head as [q | k | v]; after attention the output
is RMS-normalised over all heads, gated by sigmoid(output_gate(x)) and projected. Head h of
layer l of L decays at rate s = (2 ** (-8 / H)) ** (h + 1) * (1 - l / (L - 1 + 1e-5) + 1e-5),
computed from the config (checkpoints may also store it and its decay tables: ignored).

Per step the layer reads the forward context like the Mamba2 mixer (`mamba_mixer.step_plan`):
the leading one-token sequences that continue from their slot take one recurrent step each
(batched over slots); the prefill chunks after them run block-wise from their slot's state
(or zeros) and write their final state back. Without a state cache (the memory profile) every
sequence starts from zeros and nothing is written.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitserve.kernels import dispatch
from splitserve.worker.attention import current_metadata
from splitserve.worker.cache_spec import RecurrentStateSpec
from splitserve.worker.layers import RMSNorm
from splitserve.worker.linear import Linear
from splitserve.worker.mamba_mixer import step_plan

SUPPORTED_ACTIVATIONS = ("silu", "swish")


def check_lightning_config(config: Any) -> None:
    """ValueError naming the first config field the lightning layer cannot serve."""
    act = getattr(config, "hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden_act {act!r} for lightning attention; supported: "
            f"{', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    block = getattr(config, "block_size", 256)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block_size must be a positive integer, got {block!r}")
    if config.num_hidden_layers < 2:
        raise ValueError(
            f"lightning attention's decay needs num_hidden_layers >= 2, got "
            f"{config.num_hidden_layers}"
        )


def slope_rates(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """The per-head decay rates s > 0 of one layer, fp32 [H] (MiniMax's ALiBi-like slopes,
    shrunk linearly with depth)."""
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** (torch.arange(num_heads, dtype=torch.float32) + 1)
    return rate * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)


class LightningAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        check_lightning_config(config)
        self.layer_idx = layer_idx
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or (config.hidden_size // self.num_heads)
        self.block_size = getattr(config, "block_size", 256)
        inner = self.num_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, 3 * inner, bias=False)
        self.output_gate = Linear(config.hidden_size, inner, bias=False)
        self.out_proj = Linear(inner, config.hidden_size, bias=False)
        # NOTE: transformers' MiniMaxRMSNorm default eps, which the layer never overrides.
        self.norm = RMSNorm(inner, 1e-6)
        self.slope = nn.Buffer(torch.empty(self.num_heads), persistent=False)
        self.state_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        """(empty [slots, 0], kv [slots, H, D, D]), bound by StateCache."""

    def init_slopes(self) -> None:
        """After materialising from the meta device."""
        rates = slope_rates(self.num_heads, self.layer_idx, self.num_layers)
        self.slope = rates.to(self.slope.device)

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> RecurrentStateSpec:
        """The running k^T v sum, kept in fp32 whatever the model's dtype: it accumulates over
        the whole context. No convolution: the spec's conv part is empty."""
        return RecurrentStateSpec(
            self.layer_idx, (0,), (self.num_heads, self.head_dim, self.head_dim), torch.float32
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, hidden] of the step's packed sequences -> [T, hidden]."""
        meta = current_metadata()
        plan = step_plan(meta)
        kv = self.state_cache[1] if meta.state_slots is not None else None
        num_tokens = hidden_states.shape[0]
        qkv = torch.nn.functional.silu(self.qkv_proj(hidden_states))
        q, k, v = qkv.view(num_tokens, self.num_heads, 3 * self.head_dim).split(
            self.head_dim, dim=-1
        )
        out = hidden_states.new_empty(num_tokens, self.num_heads, self.head_dim)
        nd, ndt = plan.num_decodes, plan.num_decode_tokens
        if nd:
            if plan.fresh_decode_slots is not None:
                kv.index_fill_(0, plan.fresh_decode_slots, 0)
            out[:ndt] = dispatch.lightning_decode(
                q[:ndt], k[:ndt], v[:ndt], self.slope, kv, plan.decode_slots
            )
        if ndt < num_tokens:
            out[ndt:] = dispatch.lightning_prefill(
                q[ndt:],
                k[ndt:],
                v[ndt:],
                self.slope,
                self.block_size,
                kv,
                plan.prefill_cu,
                plan.prefill_slots,
                plan.prefill_has_initial,
            )
        out = self.norm(out.view(num_tokens, -1))
        out = torch.sigmoid(self.output_gate(hidden_states)) * out
        return self.out_proj(out)
