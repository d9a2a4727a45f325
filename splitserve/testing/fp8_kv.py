"""transformers as the oracle of an FP8 KV cache (tests only).

`register_rounded_kv_attention` registers an attention implementation with transformers'
AttentionInterface that rounds each layer's key and value states (after RoPE) the way an FP8
cache stores them (`kv_quantize_ref`, then `kv_dequantize_ref` with that layer's scales) and
then runs transformers' own SDPA attention. Load a model with
`attn_implementation=<the returned name>` to get what splitserve's `--kv-cache-dtype fp8`
should produce on the same weights.
"""

from __future__ import annotations

import torch

from splitserve.kernels.reference import kv_dequantize_ref, kv_quantize_ref


def register_rounded_kv_attention(
    scales: dict[int, tuple[float, float]], dtype: torch.dtype = torch.float8_e4m3fn
) -> str:
    """Register the implementation for per-layer (k_scale, v_scale) `scales` (1.0 for layers
    not named); returns its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def rounded(x: torch.Tensor, scale: float) -> torch.Tensor:
        return kv_dequantize_ref(kv_quantize_ref(x, dtype, scale), scale, x.dtype)

    def attention(module, query, key, value, attention_mask, **kwargs):
        k_scale, v_scale = scales.get(module.layer_idx, (1.0, 1.0))
        return sdpa_attention_forward(
            module, query, rounded(key, k_scale), rounded(value, v_scale), attention_mask, **kwargs
        )

    key = ",".join(f"{i}:{k}:{v}" for i, (k, v) in sorted(scales.items()))
    name = f"rounded_kv_{str(dtype).removeprefix('torch.')}_{key}"
    AttentionInterface.register(name, attention)
    return name
