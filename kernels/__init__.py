"""Triton kernels for splitserve, each beside a plain-torch reference.

Callers (the worker) use `splitserve.kernels.dispatch`, which runs the Triton launcher on CUDA
tensors and the torch path otherwise. The Triton modules are imported lazily there, so this
package imports on machines without triton.

Modules:
    reference           plain-torch references (the oracle of every kernel test)
    torch_attention     CPU paths of paged attention (per-step plan) and the KV-cache write
    torch_ops           CPU paths of RMSNorm (+ residual add), rotary and SiLU-and-mul
    torch_moe           grouped torch path of the fused MoE op (each expert on its own tokens)
    fused_moe           grouped-GEMM MoE experts (device-side alignment, no host sync)
    grouped_gemm        m-grouped GEMM, contiguous and masked layouts, float and block FP8
    grouped_moe         MoE experts on the grouped GEMM (both layouts, FP8 experts kept FP8)
    torch_grouped_gemm  plain-torch references of the grouped GEMM and the FP8 MoE
    attention_prefill   varlen paged attention (prefill, chunked prefill, mixed batches)
    attention_decode    split-KV paged decode attention + reduce
    kv_cache            scatter of new keys/values into the paged cache
    rms_norm            RMSNorm with optional fused residual add
    rotary              cos/sin cache builders (default, linear, llama3, yarn), pure torch
    rotary_kernel       in-place rotary embedding (neox and gpt-j layouts)
    activation          SiLU-and-mul, GELU-and-mul (erf and tanh)
    token_bitmask       packed int32 grammar bitmask applied to logits
    fp8_gemm            W8A16 FP8 GEMM (per-tensor, per-channel and block scales)
    dispatch            backend choice and the op-level functions the worker calls
"""

from __future__ import annotations

from .dispatch import (
    apply_rotary,
    apply_token_bitmask,
    fp8_linear,
    fused_add_rms_norm,
    fused_moe,
    gelu_and_mul,
    paged_attention,
    rms_norm,
    select_attention_backend,
    silu_and_mul,
    write_kv_cache,
)

__all__ = [
    "apply_rotary",
    "apply_token_bitmask",
    "fp8_linear",
    "fused_add_rms_norm",
    "fused_moe",
    "gelu_and_mul",
    "paged_attention",
    "rms_norm",
    "select_attention_backend",
    "silu_and_mul",
    "write_kv_cache",
]
