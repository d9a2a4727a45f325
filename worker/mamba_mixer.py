"""The Mamba2 mixer (SSD): in_proj, depthwise causal conv1d, the selective state-space scan
with grouped B/C, gated RMSNorm, out_proj; its recurrent state lives in the state slots.

Parameter names mirror Hugging Face's `Mamba2Mixer`, so checkpoints load by name. Per step the
mixer reads the forward context: `query_start_loc` splits the packed tokens into sequences,
`state_slots` names each sequence's slot, `has_initial_state` whether it continues from it.
The runner lays out one-token queries first, so the step splits into a leading run of decodes
(one recurrent step each, batched over slots) and the prefill chunks after them (the chunked
scan, reading the slot's state when the chunk continues a prompt, writing the final state).
Without a state cache (the memory profile) every sequence starts from zeros and nothing is
written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import dispatch
from splitserve.worker.attention import AttentionMetadata, current_metadata
from splitserve.worker.cache_spec import RecurrentStateSpec
from splitserve.worker.linear import Linear

SUPPORTED_ACTIVATIONS = ("silu", "swish")


def check_mamba2_config(config: Any) -> None:
    """ValueError naming the first config field the mixer cannot serve."""
    act = getattr(config, "hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden_act {act!r} in the state-space config; supported: "
            f"{', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    intermediate = int(config.expand * config.hidden_size)
    if intermediate != config.num_heads * config.head_dim:
        raise ValueError(
            f"expand * hidden_size ({intermediate}) must equal num_heads * head_dim "
            f"({config.num_heads} * {config.head_dim})"
        )
    if config.n_groups < 1 or config.num_heads % config.n_groups:
        raise ValueError(
            f"num_heads ({config.num_heads}) must be a multiple of n_groups ({config.n_groups})"
        )
    if config.chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {config.chunk_size}")
    if config.conv_kernel < 2:
        raise ValueError(f"conv_kernel must be at least 2, got {config.conv_kernel}")
    limit = tuple(getattr(config, "time_step_limit", (0.0, float("inf"))))
    if len(limit) != 2 or not limit[0] <= limit[1]:
        raise ValueError(f"time_step_limit must be (min, max) with min <= max, got {limit}")


class MambaConv1d(nn.Module):
    """The depthwise conv's parameters, shaped as nn.Conv1d's (weight [D, 1, K])."""

    def __init__(self, channels: int, kernel: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(channels), requires_grad=False) if bias else None


class MixerRMSNormGated(nn.Module):
    """y * silu(z), then RMSNorm over each group of `group_size` channels, then the weight."""

    def __init__(self, hidden_size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.group_size = group_size
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() * F.silu(gate.float())
        groups = h.view(*h.shape[:-1], -1, self.group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * groups.view_as(h).to(dtype)


@dataclass(slots=True)
class MambaStepPlan:
    """How one step's sequences split, shared by every mixer layer of the step."""

    num_decodes: int
    """Leading one-token sequences that continue from their slot: one recurrent step each
    (none without a state cache)."""
    num_decode_tokens: int
    decode_slots: torch.Tensor | None
    """int64 [num_decodes]."""
    fresh_decode_slots: torch.Tensor | None
    """Slots of leading one-token sequences that start a prompt: zeroed before the step."""
    prefill_cu: torch.Tensor
    """int32 offsets of the remaining sequences' tokens, counted from num_decode_tokens."""
    prefill_slots: torch.Tensor | None
    prefill_has_initial: torch.Tensor | None


def step_plan(meta: AttentionMetadata) -> MambaStepPlan:
    plan = meta.extras.get("mamba_plan")
    if plan is not None:
        return plan
    qsl_t = meta.query_start_loc
    qsl = qsl_t.tolist()
    cached = meta.state_slots is not None
    num_decodes = 0
    while cached and num_decodes < len(qsl) - 1 and qsl[num_decodes + 1] - qsl[num_decodes] == 1:
        num_decodes += 1
    decode_slots = fresh = None
    if num_decodes:
        decode_slots = meta.state_slots[:num_decodes]
        initial = meta.has_initial_state[:num_decodes]
        if not bool(initial.all()):
            fresh = decode_slots[~initial]
    ndt = qsl[num_decodes]
    plan = MambaStepPlan(
        num_decodes,
        ndt,
        decode_slots,
        fresh,
        (qsl_t[num_decodes:] - ndt).to(torch.int32),
        meta.state_slots[num_decodes:] if cached else None,
        meta.has_initial_state[num_decodes:] if cached else None,
    )
    meta.extras["mamba_plan"] = plan
    return plan


class MambaMixer2(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        check_mamba2_config(config)
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.ssm_state_size = config.state_size
        self.n_groups = config.n_groups
        self.chunk_size = config.chunk_size
        self.conv_kernel = config.conv_kernel
        self.intermediate_size = int(config.expand * config.hidden_size)
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.time_step_limit = tuple(getattr(config, "time_step_limit", (0.0, float("inf"))))
        self.in_proj = Linear(
            config.hidden_size,
            self.intermediate_size + self.conv_dim + self.num_heads,
            bias=config.use_bias,
        )
        self.conv1d = MambaConv1d(self.conv_dim, config.conv_kernel, config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.D = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.norm = MixerRMSNormGated(
            self.intermediate_size,
            self.intermediate_size // self.n_groups,
            config.layer_norm_epsilon,
        )
        self.out_proj = Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)
        self.state_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        """(conv [slots, conv_dim, K - 1], ssm [slots, H, P, N]), bound by StateCache."""

    def cache_spec(self, block_size: int, dtype: torch.dtype) -> RecurrentStateSpec:
        return RecurrentStateSpec(
            self.layer_idx,
            (self.conv_dim, self.conv_kernel - 1),
            (self.num_heads, self.head_dim, self.ssm_state_size),
            dtype,
        )

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        lo, hi = self.time_step_limit
        if lo > 0.0 or hi != float("inf"):
            dt = dt.clamp(min=lo, max=hi)
        return dt

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, hidden] of the step's packed sequences -> [T, hidden]."""
        meta = current_metadata()
        plan = step_plan(meta)
        cache = self.state_cache if meta.state_slots is not None else None
        projected = self.in_proj(hidden_states)
        gate, xbc, dt = projected.split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )
        dt = self._dt(dt)
        A = -torch.exp(self.A_log.float())
        weight = self.conv1d.weight[:, 0, :]
        y = torch.empty(
            hidden_states.shape[0],
            self.num_heads,
            self.head_dim,
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        nd, ndt = plan.num_decodes, plan.num_decode_tokens
        if nd:
            conv_states, ssm_states = cache
            if plan.fresh_decode_slots is not None:
                conv_states.index_fill_(0, plan.fresh_decode_slots, 0)
                ssm_states.index_fill_(0, plan.fresh_decode_slots, 0)
            xbc_d = dispatch.causal_conv1d_update(
                xbc[:ndt], weight, self.conv1d.bias, conv_states, plan.decode_slots
            )
            x_d, B_d, C_d = self._split(xbc_d)
            y[:ndt] = dispatch.selective_state_update(
                ssm_states, x_d, dt[:ndt], A, B_d, C_d, self.D, plan.decode_slots
            )
        if ndt < hidden_states.shape[0]:
            xbc_p = dispatch.causal_conv1d_prefill(
                xbc[ndt:],
                weight,
                self.conv1d.bias,
                cache[0] if cache is not None else None,
                plan.prefill_cu,
                plan.prefill_slots,
                plan.prefill_has_initial,
            )
            x_p, B_p, C_p = self._split(xbc_p)
            y[ndt:] = dispatch.ssd_chunk_scan(
                x_p,
                dt[ndt:],
                A,
                B_p,
                C_p,
                self.D,
                self.chunk_size,
                cache[1] if cache is not None else None,
                plan.prefill_cu,
                plan.prefill_slots,
                plan.prefill_has_initial,
            )
        out = self.norm(y.view(-1, self.intermediate_size), gate)
        return self.out_proj(out)

    def _split(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv output [T, conv_dim] -> x [T, H, P], B and C [T, G, N]."""
        gn = self.n_groups * self.ssm_state_size
        x, B, C = xbc.split([self.intermediate_size, gn, gn], dim=-1)
        shape = (-1, self.n_groups, self.ssm_state_size)
        return x.reshape(-1, self.num_heads, self.head_dim), B.reshape(shape), C.reshape(shape)
