"""Compile every kernel for real GPU targets (sm_80, sm_89, sm_90) without a GPU.

The interpreter runs kernels as numpy and forgives things the compiler does not (loop-carried
type changes, tl.dot shape/dtype limits, bf16 paths, constexpr branches it never took). Triton
lowers to PTX and assembles a cubin with its bundled ptxas on any host, so these tests catch
compile errors on CPU-only machines. `@triton.jit` yields interpreter objects while
TRITON_INTERPRET=1, so the compiling happens in one child process started with it unset; each
test then checks its own case in that child's JSON report.

Run directly (`python tests/kernels/test_kernel_compile.py`) to compile and print all cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

INT32_POINTERS = {
    "block_tables_ptr", "seq_lens_ptr", "cu_seqlens_q_ptr", "bitmask_ptr", "indices_ptr",
    "pair_ids_ptr", "block_expert_ptr", "group_ptr",
}  # fmt: skip
INT64_POINTERS = {"positions_ptr", "slot_mapping_ptr"}
UINT8_POINTERS = {"blocks_ptr", "scales_ptr"}
FP32_POINTERS = {
    "sinks_ptr", "part_acc_ptr", "part_m_ptr", "part_l_ptr", "topk_weights_ptr", "a_scale_ptr",
    "b_scale_ptr",
}  # fmt: skip
FLOAT_SCALARS = {"scale", "soft_cap", "eps"}


def _compile(kernel, dtype: str, constexprs: dict, arch: int = 90, pointers: dict | None = None):
    """Compile with every pointer typed `dtype` unless its name says otherwise, or `pointers`
    (name -> type) does (child only)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif pointers and name in pointers:
            signature[name] = pointers[name]
        elif name in INT32_POINTERS:
            signature[name] = "*i32"
        elif name in INT64_POINTERS:
            signature[name] = "*i64"
        elif name in UINT8_POINTERS:
            signature[name] = "*u8"
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    src = ASTSource(kernel, signature, constexprs={(index[k],): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"]
    return compiled


def _attention_meta(dtype: str, head_dim_pad: int, features: bool) -> dict:
    return {
        "BLOCK_N": 64 if head_dim_pad <= 128 else 32,
        "HEAD_DIM_PAD": head_dim_pad,
        "BLOCK_SIZE": 16,
        "USE_WINDOW": features,
        "USE_SOFTCAP": features,
        "USE_SINKS": features,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "KV_FP8": 0,
    }


ATTENTION_CASES = [
    ("fp16", 128, True, 90),
    ("bf16", 256, False, 90),
    ("fp32", 64, True, 80),
    ("bf16", 128, True, 80),
]


def _cases() -> dict[str, object]:
    """Case name -> zero-argument function that compiles it (imports kernels lazily)."""
    from splitserve.kernels.activation import _act_and_mul_kernel
    from splitserve.kernels.attention_decode import (
        _paged_attention_decode_kernel,
        _paged_attention_reduce_kernel,
    )
    from splitserve.kernels.attention_prefill import _paged_attention_prefill_kernel
    from splitserve.kernels.fused_moe import _fused_moe_kernel
    from splitserve.kernels.grouped_gemm import _grouped_gemm_kernel
    from splitserve.kernels.kv_cache import _write_kv_cache_kernel
    from splitserve.kernels.mxfp4_moe import _mxfp4_moe_kernel
    from splitserve.kernels.rms_norm import _rms_norm_kernel
    from splitserve.kernels.rotary_kernel import _rotary_kernel
    from splitserve.kernels.token_bitmask import _apply_token_bitmask_kernel

    cases = {}
    for dtype, head_dim_pad, features, arch in ATTENTION_CASES:
        tag = f"{dtype}-d{head_dim_pad}-{'features' if features else 'plain'}-sm{arch}"
        meta = _attention_meta(dtype, head_dim_pad, features)
        prefill = {**meta, "QPK": 3, "QPK_PAD": 4, "BLOCK_Q": 16}
        cases[f"prefill-{tag}"] = (_paged_attention_prefill_kernel, dtype, prefill, arch)
        for split in (True, False):
            decode = {**meta, "QPK": 8, "M_PAD": 16, "PARTITION_SIZE": 512, "SPLIT": split}
            cases[f"decode-{tag}-split{split}"] = (
                _paged_attention_decode_kernel,
                dtype,
                decode,
                arch,
            )
    # An FP8 KV cache (`--kv-cache-dtype fp8`): e4m3 and e5m2 as types where Triton has them,
    # e4m3 as bytes below sm_89 (mode 2, decoded in the kernel).
    for name, cache, arch, mode in (
        ("e4m3-sm90", "*fp8e4nv", 90, 1), ("e5m2-sm80", "*fp8e5", 80, 1),
        ("e4m3bytes-sm80", "*u8", 80, 2),
    ):  # fmt: skip
        meta = {**_attention_meta("bf16", 128, False), "KV_FP8": mode}
        pointers = {"k_cache_ptr": cache, "v_cache_ptr": cache}
        prefill = {**meta, "QPK": 4, "QPK_PAD": 4, "BLOCK_Q": 16}
        cases[f"prefill-kv_{name}"] = (_paged_attention_prefill_kernel, "bf16", prefill, arch, pointers)  # fmt: skip
        decode = {**meta, "QPK": 4, "M_PAD": 16, "PARTITION_SIZE": 512, "SPLIT": True}
        cases[f"decode-kv_{name}"] = (_paged_attention_decode_kernel, "bf16", decode, arch, pointers)  # fmt: skip
    for features in (True, False):
        meta = {
            "BLOCK_P": 8, "HEAD_DIM_PAD": 128, "PARTITION_SIZE": 512, "USE_WINDOW": features,
            "USE_SINKS": features,
        }  # fmt: skip
        cases[f"reduce-features{features}"] = (_paged_attention_reduce_kernel, "bf16", meta, 90)
    for dtype in ("fp16", "bf16"):
        cases[f"kv_cache-{dtype}"] = (
            _write_kv_cache_kernel,
            dtype,
            {"HEADS_PAD": 8, "HEAD_DIM_PAD": 128},
            90,
        )
        cases[f"rms_norm-{dtype}"] = (
            _rms_norm_kernel,
            dtype,
            {"BLOCK": 4096, "FUSED_ADD": True},
            90,
        )
        meta = {"Q_HEADS_PAD": 32, "K_HEADS_PAD": 8, "HALF_PAD": 64, "IS_NEOX": dtype == "fp16"}
        cases[f"rotary-{dtype}"] = (_rotary_kernel, dtype, meta, 90)
        for act in range(3):
            cases[f"act{act}-{dtype}"] = (
                _act_and_mul_kernel,
                dtype,
                {"ACT": act, "BLOCK": 1024},
                90,
            )
        meta = {"HAS_INDICES": dtype == "bf16", "BLOCK_V": 1024}
        cases[f"bitmask-{dtype}"] = (_apply_token_bitmask_kernel, dtype, meta, 90)
    for dtype, arch in (("fp16", 90), ("bf16", 80), ("fp32", 90)):
        for gate_up in (True, False):
            meta = {
                "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "A_BY_TOKEN": gate_up,
                "MUL_WEIGHT": not gate_up, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                "HAS_BIAS": gate_up,
            }  # fmt: skip
            cases[f"fused_moe-{dtype}-sm{arch}-{'gate_up' if gate_up else 'down'}"] = (
                _fused_moe_kernel,
                dtype,
                meta,
                arch,
            )
            cases[f"mxfp4_moe-{dtype}-sm{arch}-{'gate_up' if gate_up else 'down'}"] = (
                _mxfp4_moe_kernel,
                dtype,
                {**meta, "BLOCK_K": 64, "HAS_BIAS": True},
                arch,
            )
    for tag, dtype, arch, fp8 in GROUPED_CASES:
        for masked in (False, True):
            meta = {
                "MASKED": masked, "FP8": fp8, "BLOCK_M": 64 if arch == 90 else 16,
                "BLOCK_N": 64, "BLOCK_K": 128 if fp8 else 64,
                "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
            }  # fmt: skip
            pointers = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv"} if fp8 else {}
            layout = "masked" if masked else "contiguous"
            cases[f"grouped_gemm-{tag}-{layout}"] = (
                _grouped_gemm_kernel, dtype, meta, arch, pointers
            )  # fmt: skip
    cases.update(_quant_and_state_cases())
    return cases


def _quant_and_state_cases() -> dict:
    """The quantized GEMMs (W8A16 and W8A8 FP8, W4A16 int4) and the recurrent-state kernels
    (Mamba2's SSD scan and state update, MiniMax's lightning attention)."""
    from splitserve.kernels.fp8_gemm import _fp8_w8a16_kernel
    from splitserve.kernels.fp8_scaled_mm import _fp8_w8a8_kernel
    from splitserve.kernels.lightning_attention import (
        _lightning_decode_kernel,
        _lightning_prefill_kernel,
    )
    from splitserve.kernels.ssd_scan import _ssd_scan_kernel, _state_update_kernel
    from splitserve.kernels.w4a16_gemm import _w4a16_kernel

    fp8 = "*fp8e4nv"
    state = {
        "A_ptr": "*fp32", "D_ptr": "*fp32", "slope_ptr": "*fp32", "cu_ptr": "*i32",
        "slot_ptr": "*i64", "init_ptr": "*i32",
    }  # fmt: skip
    cases = {}
    for dtype, arch, per_tile in (("bf16", 90, True), ("fp16", 80, False), ("fp32", 90, True)):
        gemm = {
            "HAS_BIAS": per_tile, "SCALE_PER_TILE": per_tile, "BLOCK_M": 16, "BLOCK_N": 64,
            "BLOCK_K": 128, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
        }  # fmt: skip
        # NOTE: below sm_89 Triton has no e4m3 type: the weight goes in as bytes.
        bits = arch < 89
        pointers = {"w_ptr": "*u8" if bits else fp8, "scale_ptr": "*fp32"}
        meta = {**gemm, "W_BITS": bits}
        cases[f"fp8_w8a16-{dtype}-sm{arch}"] = (_fp8_w8a16_kernel, dtype, meta, arch, pointers)
        # NOTE: split-K partial sums go to an fp32 buffer.
        pointers = {"qw_ptr": "*i32", "out_ptr": "*fp32" if per_tile else f"*{dtype}"}
        cases[f"w4a16-{dtype}-sm{arch}"] = (_w4a16_kernel, dtype, gemm, arch, pointers)
    for out, arch, at_end in (("bf16", 90, True), ("fp16", 89, False), ("fp32", 90, False)):
        meta = {"HAS_BIAS": at_end, "SCALE_AT_END": at_end, "BLOCK_M": 64, "BLOCK_N": 64,
                "BLOCK_K": 128}  # fmt: skip
        pointers = {"a_ptr": fp8, "w_ptr": fp8, "w_scale_ptr": "*fp32"}
        cases[f"fp8_w8a8-{out}-sm{arch}"] = (_fp8_w8a8_kernel, out, meta, arch, pointers)
    for dtype, arch, has_state, st in (("bf16", 90, True, "fp32"), ("fp16", 80, False, "fp16")):
        pointers = {**state, "state_ptr": f"*{st}"}
        meta = {"HAS_D": has_state, "HAS_STATE": has_state, "BLOCK_Q": 32, "BLOCK_P": 64,
                "BLOCK_N": 128}  # fmt: skip
        cases[f"ssd_scan-{dtype}-sm{arch}"] = (_ssd_scan_kernel, dtype, meta, arch, pointers)
        meta = {"HAS_D": has_state, "BLOCK_P": 32, "BLOCK_N": 128}
        cases[f"ssd_update-{dtype}-sm{arch}"] = (_state_update_kernel, dtype, meta, arch, pointers)
        meta = {"HAS_STATE": has_state, "BLOCK_T": 32, "BLOCK_D": 128, "BLOCK_V": 64}
        cases[f"lightning_prefill-{dtype}-sm{arch}"] = (
            _lightning_prefill_kernel, dtype, meta, arch, pointers
        )  # fmt: skip
        meta = {"BLOCK_D": 128, "BLOCK_V": 64}
        cases[f"lightning_decode-{dtype}-sm{arch}"] = (
            _lightning_decode_kernel, dtype, meta, arch, pointers
        )  # fmt: skip
    return cases


# (name, output dtype, arch, FP8 operands)
GROUPED_CASES = [
    ("bf16-sm90", "bf16", 90, False),
    ("fp16-sm80", "fp16", 80, False),
    ("fp32-sm90", "fp32", 90, False),
    ("fp8-sm90", "bf16", 90, True),
    ("fp8-sm89", "fp32", 89, True),
]

CASE_NAMES = [
    *(f"prefill-{d}-d{h}-{'features' if f else 'plain'}-sm{a}" for d, h, f, a in ATTENTION_CASES),
    *(
        f"decode-{d}-d{h}-{'features' if f else 'plain'}-sm{a}-split{s}"
        for d, h, f, a in ATTENTION_CASES
        for s in (True, False)
    ),
    *(f"{k}-kv_{c}" for k in ("prefill", "decode") for c in ("e4m3-sm90", "e5m2-sm80", "e4m3bytes-sm80")),
    "reduce-featuresTrue", "reduce-featuresFalse",
    *(f"{k}-{d}" for d in ("fp16", "bf16") for k in ("kv_cache", "rms_norm", "rotary", "act0", "act1", "act2", "bitmask")),
    *(f"fused_moe-{d}-{p}" for d in ("fp16-sm90", "bf16-sm80", "fp32-sm90") for p in ("gate_up", "down")),
    *(f"mxfp4_moe-{d}-{p}" for d in ("fp16-sm90", "bf16-sm80", "fp32-sm90") for p in ("gate_up", "down")),
    *(f"grouped_gemm-{c[0]}-{lay}" for c in GROUPED_CASES for lay in ("contiguous", "masked")),
    *(f"{k}-{d}" for d in ("bf16-sm90", "fp16-sm80", "fp32-sm90") for k in ("fp8_w8a16", "w4a16")),
    "fp8_w8a8-bf16-sm90", "fp8_w8a8-fp16-sm89", "fp8_w8a8-fp32-sm90",
    *(f"{k}-{d}" for d in ("bf16-sm90", "fp16-sm80") for k in ("ssd_scan", "ssd_update", "lightning_prefill", "lightning_decode")),
]  # fmt: skip


def _compile_all() -> dict[str, str]:
    """Child process body: compile every case, return name -> "ok" or the error text."""
    results = {}
    for name, (kernel, dtype, meta, arch, *pointers) in _cases().items():
        try:
            _compile(kernel, dtype, meta, arch, *pointers)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - report every case, not just the first failure
            results[name] = traceback.format_exc(limit=3)
    return results


@pytest.fixture(scope="module")
def compile_report() -> dict[str, str]:
    pytest.importorskip("triton")
    import torch

    if torch.cuda.is_available():
        # There the kernel tests compile and run them on the device (and gpu_check.sh's
        # kernel_tests step has no time for the cross-target compiles: minutes cold).
        pytest.skip("a CUDA device compiles these kernels for real")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--json"], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"compile child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASE_NAMES)
def test_kernel_compiles_for_gpu(compile_report, case):
    assert case in compile_report, f"case {case} missing from {sorted(compile_report)}"
    assert compile_report[case] == "ok", compile_report[case]


if __name__ == "__main__":
    report = _compile_all()
    if "--json" in sys.argv:
        print(json.dumps(report))
    else:
        for name, status in report.items():
            print(f"{name}: {status}")
