"""The one place that decides between the Triton kernels and the torch path.

The worker resolves `--attention-backend` once with `select_attention_backend` and then calls
the op functions below, passing that backend (or None to decide from the tensor's device).
No other module should test `is_cuda` to pick an implementation.

Triton modules are imported on first use, so CPU-only installs without triton work.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

from . import reference as ref
from . import torch_gdn, torch_lightning, torch_mamba, torch_ops
from .torch_attention import TorchAttentionPlan, paged_attention_torch, write_kv_cache_torch
from .torch_moe import fused_moe_torch
from .torch_mxfp4 import fused_moe_mxfp4_torch

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1, i.e. Triton kernels run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_attention_backend(name: str, device: torch.device | str) -> str:
    """Resolve `--attention-backend` for the worker's device.

    Args:
        name: "auto", "triton" or "torch".
        device: the device the KV cache lives on.

    Returns:
        "triton" or "torch". auto picks triton on CUDA (when installed) and torch elsewhere.

    Raises:
        ValueError: unknown name, or "triton" where it cannot run (not installed, or a non-CUDA
            device without TRITON_INTERPRET=1).
    """
    choice = name.lower()
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    device = torch.device(device)
    if choice == "auto":
        if device.type == "cuda" and not triton_available():
            logger.warning(
                "triton is not installed; using the torch attention backend on %s", device
            )
            return "torch"
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("--attention-backend triton requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(
                f"--attention-backend triton needs a CUDA device, got {device}; use 'torch' or "
                "'auto' (or set TRITON_INTERPRET=1 to run the kernels in the interpreter)"
            )
    return choice


def _kernel_module(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def _use_triton(t: torch.Tensor, backend: str | None) -> bool:
    if backend is None or backend == "auto":
        return t.is_cuda and triton_available()
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS} or None, got {backend!r}")
    return backend == "triton"


# --------------------------------------------------------------------------- attention


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
    plan: TorchAttentionPlan | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal paged attention of new tokens against the KV cache (which already holds them).

    Args:
        q: [T, Hq, D]; key_cache, value_cache: [NB, BS, Hk, D]; block_tables: int32 [S, MB];
        seq_lens: int32 [S]; cu_seqlens_q: int32 [S + 1]; sinks: fp32 [Hq] or None.
        max_query_len, max_seq_len: host-side maxima (avoid a device sync; under CUDA graphs
            pass fixed values). max_query_len == 1 selects the split-KV decode kernel.
        backend: "triton", "torch", or None/"auto" to follow q's device.
        k_scale, v_scale: per-tensor scales of an FP8 cache (`--kv-cache-dtype fp8`), which
            holds keys / k_scale and values / v_scale; ignored by other cache dtypes.
        plan, key, value: torch path only (Triton ignores them): the step's
            `TorchAttentionPlan` shared by all layers, and this step's keys/values [T, Hk, D],
            which sequences without a cached prefix attend over directly. With no cache
            (key_cache None, cache-free forwards such as memory profiling) key/value are
            required and the torch path runs whatever `backend` says.

    Returns:
        [T, Hq, D].
    """
    kwargs = dict(
        sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks, out=out,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    if key_cache is None or not _use_triton(q, backend):
        return paged_attention_torch(
            q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
            plan=plan, key=key, value=value, **kwargs,
        )  # fmt: skip
    if max_query_len is None:
        max_query_len = (
            int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if len(seq_lens) else 0
        )
    if max_query_len == 1:
        return _kernel_module("attention_decode").paged_attention_decode(
            q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
            max_seq_len=max_seq_len, **kwargs,
        )  # fmt: skip
    return _kernel_module("attention_prefill").paged_attention_prefill(
        q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
        max_query_len=max_query_len, **kwargs,
    )  # fmt: skip


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter key/value [T, Hk, D] into [NB, BS, Hk, D] caches at slot_mapping (int64 [T],
    negative = skip), in place; an FP8 cache stores them divided by k_scale / v_scale."""
    if _use_triton(key, backend):
        _kernel_module("kv_cache").write_kv_cache(
            key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale
        )
    else:
        write_kv_cache_torch(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


# --------------------------------------------------------------------------- elementwise ops
# CPU paths: `torch_ops` (fused / in-place torch); GELU uses its reference,
# already vectorised torch.


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim, HF Llama numerics. x: [..., N], weight: [N] -> [..., N]."""
    if _use_triton(x, backend):
        return _kernel_module("rms_norm").rms_norm(x, weight, eps)
    return torch_ops.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); x, residual: [..., N], weight: [N].

    NOTE: x is consumed: the torch path writes the sum into it (and returns it as the new
    residual), the Triton kernel returns fresh tensors. Callers must not reuse x.
    """
    if _use_triton(x, backend):
        return _kernel_module("rms_norm").fused_add_rms_norm(x, residual, weight, eps)
    return torch_ops.fused_add_rms_norm(x, residual, weight, eps)


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] IN PLACE by positions int64 [T]; returns (q, k).

    cos_sin_cache: [max_pos, R] from `rotary.build_cos_sin_cache`; only the first R dims rotate.
    """
    if _use_triton(q, backend):
        return _kernel_module("rotary_kernel").apply_rotary(positions, q, k, cos_sin_cache, is_neox)
    return torch_ops.apply_rotary(positions, q, k, cos_sin_cache, is_neox)


def silu_and_mul(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:]; x: [..., 2I] -> [..., I]."""
    if _use_triton(x, backend):
        return _kernel_module("activation").silu_and_mul(x)
    return torch_ops.silu_and_mul(x)


def gelu_and_mul(
    x: torch.Tensor, approximate: str = "none", *, backend: str | None = None
) -> torch.Tensor:
    """gelu(x[..., :I]) * x[..., I:], approximate "none" (erf) or "tanh"; [..., 2I] -> [..., I]."""
    if _use_triton(x, backend):
        return _kernel_module("activation").gelu_and_mul(x, approximate)
    return ref.gelu_and_mul_ref(x, approximate)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
    backend: str | None = None,
) -> torch.Tensor:
    """SwiGLU experts on their routed tokens: x [T, H], w13 [E, 2I, H] (gate, then up rows),
    w2 [E, H, I], topk_weights [T, K], topk_ids int [T, K] -> [T, H], weighted sum per token.
    Optional per-expert biases b13 [E, 2I], b2 [E, H]; a swiglu_limit selects gpt-oss's
    clamped SwiGLU.

    Both paths compute each expert on its own tokens only. The torch path (`torch_moe`) reads
    the routing on the host; the Triton ones do not, so they can be captured: plain SwiGLU
    experts run on the grouped GEMM (`grouped_moe`: contiguous layout for prefill, masked for
    decode), experts with biases or the clamped SwiGLU on the fused kernel (`fused_moe`).
    """
    extra = dict(b13=b13, b2=b2, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha)
    if _use_triton(x, backend):
        if b13 is None and b2 is None and swiglu_limit is None:
            return _kernel_module("grouped_moe").grouped_moe(x, w13, w2, topk_weights, topk_ids)
        return _kernel_module("fused_moe").fused_moe(x, w13, w2, topk_weights, topk_ids, **extra)
    return fused_moe_torch(x, w13, w2, topk_weights, topk_ids, **extra)


def fp8_moe_native(device: torch.device | str, block: tuple[int, int]) -> bool:
    """Whether block-scaled FP8 experts on `device` stay FP8 and run on the FP8 grouped GEMM
    (`fused_moe_fp8`): CUDA with triton and FP8 tensor cores (capability >= 8.9), bk a
    multiple of 32. Elsewhere they are dequantized once at load."""
    device = torch.device(device)
    if device.type != "cuda" or not triton_available():
        return False
    return _cuda_capability(device) >= W8A8_MIN_CAPABILITY and block[1] % 32 == 0


def fused_moe_fp8(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    block: tuple[int, int],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`fused_moe` on block-scaled FP8 experts: w13 float8_e4m3fn [E, 2I, H] with scales
    [E, ceil(2I / bn), ceil(H / bk)], w2 [E, H, I] with [E, ceil(H / bn), ceil(I / bk)].
    Triton: the FP8 grouped GEMM with the activations quantized per token and bk-group (W8A8);
    the torch path dequantizes the stacks and runs weight-only."""
    args = (x, w13, w2, topk_weights, topk_ids)
    if _use_triton(x, backend):
        return _kernel_module("grouped_moe").grouped_moe(
            *args, w13_scale=w13_scale, w2_scale=w2_scale, block=block
        )
    torch_grouped_gemm = _kernel_module("torch_grouped_gemm")
    return torch_grouped_gemm.fused_moe_fp8_weight_only_torch(
        x, w13, w13_scale, w2, w2_scale, block, topk_weights, topk_ids
    )


def mxfp4_moe_available(device: torch.device) -> bool:
    """Whether MXFP4 experts on `device` run packed through the Triton kernel (CUDA with
    triton); elsewhere they are dequantized once at load."""
    return torch.device(device).type == "cuda" and triton_available()


def fused_moe_mxfp4(
    x: torch.Tensor,
    w13_blocks: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
    backend: str | None = None,
) -> torch.Tensor:
    """`fused_moe` on MXFP4 experts: w13 as blocks uint8 [E, 2I, H / 32, 16] + scales uint8
    [E, 2I, H / 32] (gate rows, then up rows), w2 as [E, H, I / 32, 16] + [E, H, I / 32].
    Triton (`mxfp4_moe`) decodes the blocks in the GEMM's load stage; the torch path
    dequantizes first."""
    extra = dict(b13=b13, b2=b2, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha)
    args = (x, w13_blocks, w13_scales, w2_blocks, w2_scales, topk_weights, topk_ids)
    if _use_triton(x, backend):
        return _kernel_module("mxfp4_moe").fused_moe_mxfp4(*args, **extra)
    return fused_moe_mxfp4_torch(*args, **extra)


def apply_token_bitmask(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> None:
    """-inf the logits [B, V] of tokens whose bit is clear in bitmask int32 [B, W], in place;
    optional indices [R] restrict it to those rows."""
    if _use_triton(logits, backend):
        _kernel_module("token_bitmask").apply_token_bitmask(logits, bitmask, indices)
    else:
        torch_ops.apply_token_bitmask(logits, bitmask, indices)


# --------------------------------------------------------------------------- quantized GEMM


W8A8_MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores (Ada, Hopper and later): the W8A8 GEMM; older GPUs take W8A16."""


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (looked up once: every FP8 layer asks)."""
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def fp8_gemm_kind(x: torch.Tensor, block: tuple[int, int], backend: str | None = None) -> str:
    """Which FP8 GEMM `fp8_linear` runs for activations `x` and a weight scale block: "torch"
    (the reference, weight-only) off the Triton backend, else `fp8_kernel_for` the device."""
    if not _use_triton(x, backend):
        return "torch"
    capability = _cuda_capability(x.device) if x.is_cuda else None
    return fp8_kernel_for(capability, block, x.shape[-1])


def fp8_kernel_for(capability: tuple[int, int] | None, block: tuple[int, int], k: int) -> str:
    """ "w8a8" (activations quantized per token, FP8 tensor cores) on CUDA capability >= 8.9
    for a block the kernel takes; otherwise "w8a16" (weight-only; capability None: not CUDA,
    e.g. the Triton interpreter)."""
    if capability is None or tuple(capability) < W8A8_MIN_CAPABILITY:
        return "w8a16"
    fp8_scaled_mm = _kernel_module("fp8_scaled_mm")
    return "w8a8" if fp8_scaled_mm.block_k_for(block, k) is not None else "w8a16"


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    activation_scale_ub: float | None = None,
    input_scale: torch.Tensor | None = None,
    weight_only: bool = False,
) -> torch.Tensor:
    """x [..., K] @ dequant(weight).T + bias -> [..., N] in x.dtype.

    weight: float8_e4m3fn [N, K]; scale: float32 [ceil(N / bn), ceil(K / bk)]; block: (bn, bk).
    `fp8_gemm_kind` picks by capability: on CUDA >= 8.9 the W8A8 GEMM (activations quantized
    per token, capped by `activation_scale_ub`, or per token and bk-group when block-scaled, or
    with the static per-tensor `input_scale` when the checkpoint has one);
    on older GPUs the W8A16 GEMM (the weight widened in the load stage); the torch path
    dequantizes the whole weight first (the CPU worker dequantizes once at load instead). The
    weight-only paths do not quantize activations, so they take no activation scale;
    `weight_only` (a checkpoint that quantized no activations) keeps W8A16 on any GPU.
    """
    kind = fp8_gemm_kind(x, block, backend)
    if kind == "w8a8" and weight_only:
        kind = "w8a16"
    if kind == "w8a8":
        return _kernel_module("fp8_scaled_mm").fp8_w8a8_linear(
            x, weight, scale, block, bias, activation_scale_ub, input_scale
        )
    if kind == "w8a16":
        return _kernel_module("fp8_gemm").fp8_w8a16_linear(x, weight, scale, block, bias)
    return ref.fp8_linear_ref(x, weight, scale, block, bias)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant(W).T + bias -> [..., N] in x.dtype, weight-only int4 (W4A16).

    qweight: int32 [K / 8, N] (`reference.int4_pack_k`); scales, zeros: [K / g, N]. Triton on
    CUDA (int4 unpacked in the GEMM's load stage); the torch path dequantizes the whole weight
    first (the CPU worker dequantizes once at load instead).
    """
    if _use_triton(x, backend):
        return _kernel_module("w4a16_gemm").w4a16_linear(x, qweight, scales, zeros, group, bias)
    return ref.w4a16_linear_ref(x, qweight, scales, zeros, group, bias)


# ---------------------------------------------------------------------------- Mamba2 (SSD)
# Shapes and semantics: `torch_mamba` (the torch path) and `causal_conv1d` / `ssd_scan` (the
# Triton kernels). Sequences are packed: cu_seqlens int32 [S + 1], state_slots int64 [S],
# has_initial_state bool [S]; the torch path reads them as lists.


def _lists(*tensors: torch.Tensor | None) -> list[list | None]:
    return [None if t is None else t.tolist() for t in tensors]


def causal_conv1d_prefill(
    x, weight, bias, conv_states, cu_seqlens, state_slots, has_initial_state, *, backend=None
) -> torch.Tensor:
    """Depthwise causal conv (SiLU) over packed sequences, conv states read and written."""
    if _use_triton(x, backend):
        return _kernel_module("causal_conv1d").causal_conv1d_prefill(
            x, weight, bias, conv_states, cu_seqlens, state_slots, has_initial_state
        )
    return torch_mamba.causal_conv1d_prefill(
        x, weight, bias, conv_states, *_lists(cu_seqlens, state_slots, has_initial_state)
    )


def causal_conv1d_update(x, weight, bias, conv_states, state_slots, *, backend=None):
    """One conv step (SiLU) per sequence, conv states updated at `state_slots`."""
    if _use_triton(x, backend):
        return _kernel_module("causal_conv1d").causal_conv1d_update(
            x, weight, bias, conv_states, state_slots
        )
    return torch_mamba.causal_conv1d_update(x, weight, bias, conv_states, state_slots)


def ssd_chunk_scan(
    x,
    dt,
    A,
    B,
    C,
    D,
    chunk_size,
    ssm_states,
    cu_seqlens,
    state_slots,
    has_initial_state,
    *,
    backend=None,
) -> torch.Tensor:
    """The chunked SSD scan over packed sequences, SSM states read and written. The Triton
    kernel tiles by its own chunk (the result does not depend on it)."""
    if _use_triton(x, backend):
        return _kernel_module("ssd_scan").ssd_chunk_scan(
            x, dt, A, B, C, D, ssm_states, cu_seqlens, state_slots, has_initial_state
        )
    return torch_mamba.ssd_chunk_scan(
        x,
        dt,
        A,
        B,
        C,
        D,
        chunk_size,
        ssm_states,
        *_lists(cu_seqlens, state_slots, has_initial_state),
    )


def selective_state_update(ssm_states, x, dt, A, B, C, D, state_slots, *, backend=None):
    """One recurrent step per sequence, SSM states updated at `state_slots`."""
    if _use_triton(x, backend):
        return _kernel_module("ssd_scan").selective_state_update(
            ssm_states, x, dt, A, B, C, D, state_slots
        )
    return torch_mamba.selective_state_update(ssm_states, x, dt, A, B, C, D, state_slots)


# ---------------------------------------------------------------------- gated delta rule
# Shapes and semantics: `torch_gdn` (the torch path) and `gated_delta` (the Triton kernels);
# packed sequences as for Mamba2 above. q and k are L2-normalised inside.


def chunk_gated_delta_rule(
    q, k, v, g, beta, states, cu_seqlens, state_slots, has_initial_state, *, backend=None
) -> torch.Tensor:
    """The chunked gated delta rule over packed sequences, states read and written."""
    if _use_triton(v, backend):
        return _kernel_module("gated_delta").chunk_gated_delta_rule(
            q, k, v, g, beta, states, cu_seqlens, state_slots, has_initial_state
        )
    return torch_gdn.chunk_gated_delta_rule(
        q, k, v, g, beta, states, *_lists(cu_seqlens, state_slots, has_initial_state)
    )


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, states, state_slots, *, backend=None):
    """One gated delta step per sequence, states updated at `state_slots`."""
    if _use_triton(v, backend):
        return _kernel_module("gated_delta").fused_recurrent_gated_delta_rule(
            q, k, v, g, beta, states, state_slots
        )
    return torch_gdn.fused_recurrent_gated_delta_rule(q, k, v, g, beta, states, state_slots)


# ------------------------------------------------------------------ lightning attention
# Shapes and semantics: `torch_lightning` (the torch path) and `lightning_attention` (the Triton
# kernels). Packed as the Mamba2 ops: cu_seqlens int32 [S + 1], state_slots int64 [S],
# has_initial_state bool [S].


def lightning_prefill(
    q,
    k,
    v,
    slope,
    block_size,
    kv_states,
    cu_seqlens,
    state_slots,
    has_initial_state,
    *,
    backend=None,
) -> torch.Tensor:
    """Block-wise lightning attention over packed sequences, KV states read and written. The
    Triton kernel tiles by its own block (the result does not depend on it)."""
    if _use_triton(q, backend):
        return _kernel_module("lightning_attention").lightning_prefill(
            q, k, v, slope, kv_states, cu_seqlens, state_slots, has_initial_state
        )
    return torch_lightning.lightning_prefill(
        q, k, v, slope, block_size, kv_states, *_lists(cu_seqlens, state_slots, has_initial_state)
    )


def lightning_decode(q, k, v, slope, kv_states, state_slots, *, backend=None) -> torch.Tensor:
    """One lightning-attention step per sequence, KV states updated at `state_slots`."""
    if _use_triton(q, backend):
        return _kernel_module("lightning_attention").lightning_decode(
            q, k, v, slope, kv_states, state_slots
        )
    return torch_lightning.lightning_decode(q, k, v, slope, kv_states, state_slots)
