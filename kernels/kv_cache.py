"""Scatter the new tokens' keys and values into the paged KV cache.

One program per token copies its [Hk, D] key and value tiles to the cache slot named by
slot_mapping. A negative slot (padding token of a CUDA-graph batch) is skipped. The store casts
to the cache dtype, so an fp32 activation can land in an fp16 cache. An FP8 cache
(`--kv-cache-dtype fp8`) stores x / scale saturated at the format's range, with one scale for
the layer's keys and one for its values: the new rows are quantized by
`reference.kv_quantize_ref` first (one elementwise pass over T x Hk x D values, small beside
the attention that reads them) and the kernel copies the FP8 bytes. NOTE: not in the kernel:
the Triton interpreter rounds fp32 -> fp8 wrongly where the mantissa carries into the exponent
(124.5 -> 64), so an in-kernel cast could not be checked on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    FP8_KV_DTYPES,
    check_float,
    check_int,
    check_kv_cache,
    check_same_device,
    next_power_of_2,
)
from .reference import kv_quantize_ref


@triton.jit
def _write_kv_cache_kernel(
    # pointers
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    # sizes
    num_kv_heads,
    head_dim,
    block_size,
    # strides (elements; the head-dim stride is 1)
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    # meta
    HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size

    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = (h < num_kv_heads)[:, None] & (d < head_dim)[None, :]
    tile = h[:, None] * stride_key_h + d[None, :]
    k = tl.load(key_ptr + t.to(tl.int64) * stride_key_t + tile, mask=mask)
    tile = h[:, None] * stride_value_h + d[None, :]
    v = tl.load(value_ptr + t.to(tl.int64) * stride_value_t + tile, mask=mask)

    kc = k_cache_ptr + block * stride_kc_b + offset * stride_kc_s
    tl.store(
        kc + h[:, None] * stride_kc_h + d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask
    )
    vc = v_cache_ptr + block * stride_vc_b + offset * stride_vc_s
    tl.store(
        vc + h[:, None] * stride_vc_h + d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask
    )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write key/value rows into the paged cache at `slot_mapping`, in place (Triton).

    Args:
        key, value: [T, Hk, D], head dim contiguous (may be strided views of a fused qkv).
        key_cache, value_cache: [NB, BS, Hk, D], head dim contiguous, any other strides.
        slot_mapping: int64 (or int32) [T]; slot = block_id * BS + offset; < 0 skips the token.
        k_scale, v_scale: an FP8 cache's per-tensor scales (ignored by other dtypes).
    """
    check_float("key", key, 3)
    check_float("value", value, 3)
    check_kv_cache("key_cache", key_cache, 4)
    check_kv_cache("value_cache", value_cache, 4)
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key/value caches differ: {key_cache.dtype} vs {value_cache.dtype}")
    if key_cache.dtype in FP8_KV_DTYPES:
        key = kv_quantize_ref(key, key_cache.dtype, k_scale)
        value = kv_quantize_ref(value, value_cache.dtype, v_scale)
    check_int("slot_mapping", slot_mapping, 1, (torch.int64, torch.int32))
    check_same_device(
        key=key,
        value=value,
        key_cache=key_cache,
        value_cache=value_cache,
        slot_mapping=slot_mapping,
    )
    if key.shape != value.shape or key.shape[0] != slot_mapping.shape[0]:
        raise ValueError(
            f"key {tuple(key.shape)}, value {tuple(value.shape)}, slot_mapping "
            f"{tuple(slot_mapping.shape)} disagree"
        )
    if key_cache.shape != value_cache.shape or key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"cache {tuple(key_cache.shape)}/{tuple(value_cache.shape)} does not hold "
            f"[Hk, D] = {tuple(key.shape[1:])}"
        )
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        num_kv_heads, head_dim, key_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        HEADS_PAD=next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        num_warps=4,
    )  # fmt: skip
