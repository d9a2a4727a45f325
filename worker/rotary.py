"""Rotary position embeddings: inverse frequencies per the config's RoPE type, and a cos/sin cache.

Semantics follow transformers' `modeling_rope_utils.py` (default, linear, llama3, yarn), so the
same checkpoint gives the same angles here and there. Both config styles are read: transformers 5
`rope_parameters = {"rope_type", "rope_theta", ...}` and the older `rope_theta` + `rope_scaling`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from splitserve.worker import layers

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DEFAULT_ROPE_THETA = 10000.0


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def rope_parameters(config: Any) -> dict:
    """Return one flat dict with `rope_type`, `rope_theta` and the scaling keys of `config`."""
    params = dict(_get(config, "rope_parameters") or {})
    legacy = _get(config, "rope_scaling") or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = _get(config, "rope_theta") or DEFAULT_ROPE_THETA
    if params["rope_type"] in ("llama3", "yarn"):
        original = _get(config, "original_max_position_embeddings")
        if original is not None:
            params["original_max_position_embeddings"] = original
        params.setdefault(
            "original_max_position_embeddings", _get(config, "max_position_embeddings")
        )
    return params


def compute_inv_freq(
    params: dict, head_dim: int, max_position_embeddings: int | None = None
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim // 2] float32, attention_scaling) for a RoPE parameter dict."""
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    base = float(params.get("rope_theta", DEFAULT_ROPE_THETA))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, params), 1.0
    return _yarn(base, head_dim, params, max_position_embeddings)


def _llama3(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(
    base: float, dim: int, params: dict, max_position_embeddings: int | None
) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(
                get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as transformers does
    ramp = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = torch.clamp((ramp - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding over a precomputed [max_positions, head_dim] cos/sin cache."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        params: dict,
        max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.params = params
        self.max_position_embeddings = max_position_embeddings
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.init_cache()

    def init_cache(self) -> None:
        """(Re)compute the cos/sin cache, on CPU, then onto the buffers' current device."""
        device = self.cos.device if "cos" in self._buffers else torch.device("cpu")
        if device.type == "meta":
            device = torch.device("cpu")
        inv_freq, scaling = compute_inv_freq(
            self.params, self.head_dim, self.max_position_embeddings
        )
        # NOTE: same float32 product and cat as transformers, so angles match bit for bit.
        positions = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device), persistent=False)

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> None:
        """Gather cos/sin for this forward's positions [T] once; every layer then reuses them."""
        cos = self.cos.index_select(0, positions).to(dtype)
        sin = self.sin.index_select(0, positions).to(dtype)
        self._step = (positions, cos, sin)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, H, D] (queries and keys together) by `positions` [T]; a new tensor."""
        step = self._step
        if step is None or step[0] is not positions or step[1].dtype != x.dtype:
            self.prepare(positions, x.dtype)
            step = self._step
        return layers.apply_rotary(x, step[1], step[2])
