"""Build rotary cos/sin caches the way Hugging Face transformers does (pure torch).

`compute_inv_freq` mirrors `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS` (plus the
models' `compute_default_rope_parameters`) for the rope types splitserve serves: "default",
"linear", "llama3" and "yarn". It returns the inverse frequencies and the attention scaling
that HF multiplies into cos and sin (yarn's mscale; 1.0 for the others).
`build_cos_sin_cache` turns them into the [max_pos, rotary_dim] table the rotary kernel reads:
cos(p * inv_freq) * scaling in the first half of row p, sin(...) * scaling in the second.

`rope_parameters_of` reads those settings out of an HF config (either config style).

Dynamic NTK and longrope rescale with the running sequence length, which a fixed table cannot
express; they are rejected with a clear error instead of silently diverging from HF.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DEFAULT_ROPE_THETA = 10000.0


def _config_get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def rope_parameters_of(config: Any) -> dict[str, Any]:
    """One flat rope dict (`rope_type`, `rope_theta`, the type's keys) from an HF config.

    Reads both config styles: transformers 5 `rope_parameters = {"rope_type", "rope_theta",
    ...}` and the older top-level `rope_theta` + `rope_scaling` (whose "type" key becomes
    "rope_type"). llama3 and yarn get `original_max_position_embeddings` from the config when
    the dict lacks it (falling back to max_position_embeddings, as transformers does).
    `config` may be a config object or a plain dict.
    """
    params = dict(_config_get(config, "rope_parameters") or {})
    for key, value in (_config_get(config, "rope_scaling") or {}).items():
        params.setdefault(key, value)
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = _config_get(config, "rope_theta") or DEFAULT_ROPE_THETA
    partial = _config_get(config, "partial_rotary_factor")
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    if params["rope_type"] in ("llama3", "yarn"):
        original = _config_get(config, "original_max_position_embeddings")
        if original is not None:
            params["original_max_position_embeddings"] = original
        params.setdefault(
            "original_max_position_embeddings", _config_get(config, "max_position_embeddings")
        )
    return params


def rope_type_of(rope_parameters: dict[str, Any] | None) -> str:
    """The rope type named by an HF `rope_parameters` / legacy `rope_scaling` dict."""
    if not rope_parameters:
        return "default"
    return rope_parameters.get("rope_type") or rope_parameters.get("type") or "default"


def rotary_dim_of(rope_parameters: dict[str, Any] | None, head_dim: int) -> int:
    """Rotated dims per head: int(head_dim * partial_rotary_factor), as HF computes it."""
    factor = (rope_parameters or {}).get("partial_rotary_factor") or 1.0
    return int(head_dim * factor)


def _base_inv_freq(base: float, dim: int, device: torch.device | None) -> torch.Tensor:
    # HF builds the exponent from an int64 arange cast to fp32, then 1 / base**x in fp32.
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponent)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    # Long wavelengths are interpolated by `factor`, short ones kept, the middle band blended.
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    params: dict[str, Any],
    dim: int,
    max_position_embeddings: int | None,
    device: torch.device | None,
) -> tuple[torch.Tensor, float]:
    base = params["rope_theta"]
    factor = params.get("factor")
    original_max = params["original_max_position_embeddings"]
    if factor is None:
        # DeepSeek-V3 style configs leave factor out and imply it from the two lengths.
        if max_position_embeddings is None:
            raise ValueError("yarn without `factor` needs max_position_embeddings")
        factor = max_position_embeddings / original_max

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(
                _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    truncate = params.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        # Dimension whose wavelength completes `num_rotations` turns over the original context.
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = (1 - ramp).to(device=device)
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def compute_inv_freq(
    rope_parameters: dict[str, Any] | None,
    head_dim: int,
    rotary_dim: int | None = None,
    *,
    max_position_embeddings: int | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for an HF rope configuration.

    Args:
        rope_parameters: the config's `rope_parameters` (or legacy `rope_scaling` merged with
            `rope_theta`); needs "rope_theta" (default 10000) and the type's own keys.
        head_dim: per-head dim.
        rotary_dim: rotated dims; defaults to int(head_dim * partial_rotary_factor).
        max_position_embeddings: only for yarn configs that omit `factor`.

    Returns:
        (inv_freq fp32 [rotary_dim // 2], attention_scaling) — cos/sin get multiplied by the
        scaling, as HF's rotary embedding does.
    """
    params = dict(rope_parameters or {})
    params.setdefault("rope_theta", DEFAULT_ROPE_THETA)
    rope_type = rope_type_of(params)
    dim = rotary_dim if rotary_dim is not None else rotary_dim_of(params, head_dim)
    if dim % 2 or not 0 < dim <= head_dim:
        raise ValueError(f"rotary_dim {dim} must be even and in (0, head_dim={head_dim}]")
    base = params["rope_theta"]
    if rope_type == "default":
        return _base_inv_freq(base, dim, device), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, dim, device) / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_base_inv_freq(base, dim, device), params), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(params, dim, max_position_embeddings, device)
    raise ValueError(f"rope_type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}")


def cos_sin_cache_from_inv_freq(
    inv_freq: torch.Tensor,
    max_position: int,
    attention_scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[max_position, 2 * len(inv_freq)]: cos(p * f) * scaling ++ sin(p * f) * scaling.

    The angle is the fp32 product position * inv_freq, exactly as HF forms it, so tables match
    HF's cos/sin bit for bit before the final dtype cast.
    """
    positions = torch.arange(max_position, device=inv_freq.device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    cache = torch.cat([freqs.cos() * attention_scaling, freqs.sin() * attention_scaling], dim=-1)
    return cache.to(dtype)


def build_cos_sin_cache(
    rope_parameters: dict[str, Any] | None,
    head_dim: int,
    max_position: int,
    rotary_dim: int | None = None,
    *,
    max_position_embeddings: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The rotary kernel's table for an HF rope configuration.

    Args:
        rope_parameters, head_dim, rotary_dim, max_position_embeddings: as `compute_inv_freq`.
        max_position: rows of the table (positions 0 .. max_position - 1).
        dtype: table dtype; fp32 keeps positions in the tens of thousands accurate.

    Returns:
        [max_position, rotary_dim] table, cos half then sin half.
    """
    inv_freq, scaling = compute_inv_freq(
        rope_parameters, head_dim, rotary_dim,
        max_position_embeddings=max_position_embeddings, device=device,
    )  # fmt: skip
    return cos_sin_cache_from_inv_freq(inv_freq, max_position, scaling, dtype)
