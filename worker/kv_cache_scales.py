"""`--kv-cache-dtype`: which dtype each attention layer's paged cache stores, and the per-layer
key / value scales of an FP8 cache read from the checkpoint.

vLLM's values: auto (the model's dtype), fp8 and fp8_e4m3 (float8_e4m3fn, scaled), fp8_e5m2
(float8_e5m2, which has the range to go unscaled: its scales stay 1.0). An FP8 cache holds
keys / k_scale and values / v_scale, saturated at the format's largest value; the attention
backends multiply them back when reading.

Checkpoints calibrated for an FP8 KV cache store the scales next to each attention layer, under
the names the quantization tools write: `self_attn.k_scale` / `self_attn.v_scale`
(compressed-tensors' kv_cache_scheme, the fp8 format), one `self_attn.kv_scale` for both (older
AutoFP8 checkpoints), or `self_attn.k_proj.output_scale` / `v_proj.output_scale` (ModelOpt). A
layer without them uses 1.0, as vLLM does. Without an FP8 cache (or with fp8_e5m2) the scale
tensors are read past: nothing uses them.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from splitserve.worker.attention import Attention
from splitserve.worker.checkpoint_slices import whole

logger = logging.getLogger(__name__)

KV_CACHE_TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
"""--kv-cache-dtype values other than auto, and the dtype each stores."""

SCALED = frozenset({"fp8", "fp8_e4m3"})
"""Values whose cache takes the checkpoint's scales."""

_SCALE_RE = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<proj>[kv])_proj\.output_scale|(?P<which>k|v|kv)_scale)$"
)


def configure_kv_cache(model: nn.Module, kv_cache_dtype: str) -> None:
    """Give every Attention layer of `model` the cache dtype `kv_cache_dtype` names (auto: the
    model's dtype, nothing to set) and remember the choice for the scale loader."""
    model.kv_cache_dtype_name = kv_cache_dtype
    dtype = KV_CACHE_TORCH_DTYPES.get(kv_cache_dtype)
    if dtype is None:
        return
    for module in model.modules():
        if isinstance(module, Attention):
            module.kv_cache_dtype = dtype


def _attention_under(module: nn.Module | None) -> Attention | None:
    if isinstance(module, Attention):
        return module
    inner = getattr(module, "attn", None)
    return inner if isinstance(inner, Attention) else None


def load_kv_scale(
    model: nn.Module, modules: dict[str, nn.Module], name: str, tensor: torch.Tensor
) -> bool:
    """Take checkpoint tensor `name` if it is a KV-cache scale of one of `model`'s attention
    layers; False when it is not one (the caller loads it as usual). Raises ValueError for a
    scale that is not one positive, finite value."""
    m = _SCALE_RE.match(name)
    if m is None:
        return False
    attention = _attention_under(modules.get(m["module"]))
    if attention is None:
        return False
    tensor = whole(tensor)  # a tensor-parallel rank reads lazily; a scale is one value
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint tensor {name}: a KV cache scale holds one value, got shape "
            f"{tuple(tensor.shape)}"
        )
    if getattr(model, "kv_cache_dtype_name", "auto") not in SCALED or tensor.is_meta:
        return True  # no scaled FP8 cache (or a shape-only preflight read): nothing to keep
    value = float(tensor.float().reshape(()))
    if not (value > 0 and value < float("inf")):
        raise ValueError(
            f"checkpoint tensor {name}: a KV cache scale must be positive and finite, got {value}"
        )
    which = m["proj"] or m["which"]
    if which in ("k", "kv"):
        attention.k_scale = value
    if which in ("v", "kv"):
        attention.v_scale = value
    return True


def log_kv_cache(model: nn.Module) -> None:
    """One line: the cache dtype and how many layers took checkpoint scales."""
    name = getattr(model, "kv_cache_dtype_name", "auto")
    if name == "auto":
        return
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    scaled = sum(1 for a in layers if a.k_scale != 1.0 or a.v_scale != 1.0)
    logger.info(
        "KV cache stored as %s: %d of %d attention layers with checkpoint scales, the rest 1.0",
        KV_CACHE_TORCH_DTYPES[name],
        scaled,
        len(layers),
    )
