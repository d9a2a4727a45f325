"""Argument checks shared by the Triton launchers.

Kept free of triton imports so that the torch-only paths (and their tests) load on machines
without triton installed.
"""

from __future__ import annotations

import torch

# NOTE: the kernels accumulate in fp32 but load/store in the tensor dtype; fp8 KV caches would
# need per-tensor scales that no caller provides yet, so they are rejected up front.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
"""KV cache dtypes stored with a per-tensor scale (`--kv-cache-dtype fp8`)."""
E4M3_NATIVE_CAPABILITY = (8, 9)
"""CUDA capability from which Triton has an e4m3 type (below it: e5m2 only)."""
FP8_NATIVE, FP8_E4M3_BYTES = 1, 2
"""`fp8_operand` modes (0: not FP8): a type Triton widens itself, or e4m3 passed as bytes."""


def fp8_operand(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(what a kernel should load, mode) for a tensor that may be FP8: 0 not FP8;
    FP8_NATIVE an FP8 type the kernel widens itself; FP8_E4M3_BYTES e4m3 on CUDA below
    capability 8.9, passed as its bytes (uint8) for `fp8_bits.e4m3_to_f32` to decode."""
    if t.dtype not in FP8_KV_DTYPES:
        return t, 0
    if (
        t.dtype == torch.float8_e4m3fn
        and t.is_cuda
        and torch.cuda.get_device_capability(t.device) < E4M3_NATIVE_CAPABILITY
    ):
        return t.view(torch.uint8), FP8_E4M3_BYTES
    return t, FP8_NATIVE


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ints."""
    return -(-a // b)


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    """Raise ValueError unless `t` is a floating tensor of rank `ndim` with a unit last stride."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {FLOAT_DTYPES}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    # Vectorised loads along the last axis assume it is contiguous.
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_kv_cache(name: str, t: torch.Tensor, ndim: int) -> None:
    """check_float for a KV cache, which may also be FP8 (FP8_KV_DTYPES)."""
    if t.dtype in FP8_KV_DTYPES:
        if t.dim() != ndim or (t.shape[-1] > 1 and t.stride(-1) != 1):
            raise ValueError(f"{name}: rank {ndim}, last dim contiguous; got {t.stride()}")
        return
    check_float(name, t, ndim)


def check_int(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise ValueError unless `t` is an integer tensor of rank `ndim` with one of `dtypes`."""
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError when the given tensors live on different devices."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: full IEEE for fp32 tensors (Triton would silently use TF32,
    ~1e-3 relative error, which fp32 models do not expect); irrelevant for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_fp8_weight(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> tuple[int, int]:
    """The FP8 GEMMs' shared checks: x [..., K] float, weight float8_e4m3fn [N, K], scale
    [ceil(N / bn), ceil(K / bk)]; returns (N, K)."""
    check_float("x", x, x.dim())
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"weight must be float8_e4m3fn [N, K], got {weight.dtype} {weight.shape}")
    n, k = weight.shape
    bn, bk = block
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    if scale.shape != (cdiv(n, bn), cdiv(k, bk)):
        raise ValueError(
            f"scale must be [{cdiv(n, bn)}, {cdiv(k, bk)}] for weight {tuple(weight.shape)} "
            f"and block {tuple(block)}, got {tuple(scale.shape)}"
        )
    return n, k
