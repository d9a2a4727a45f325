"""Compile the gated delta net's kernels (the chunked rule, the recurrent step, and the causal
conv1d it shares with Mamba2) for real GPU targets (sm_80, sm_90) without a GPU, as
test_kernel_compile.py does for the others: the interpreter forgives what the compiler does not
(non-constexpr globals, tl.dot shapes and dtypes, constexpr branches it never took). The
compiling happens in one child process started with TRITON_INTERPRET unset.

Run directly (`python -P tests/kernels/test_kernel_compile_gdn.py`) to compile and print all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

POINTER_TYPES = {
    "cu_ptr": "*i32",
    "init_ptr": "*i32",
    "slot_ptr": "*i64",
    "g_ptr": "*fp32",
    "beta_ptr": "*fp32",
    "state_ptr": "*fp32",
}
"""Pointers whose type does not follow the activations' dtype (the rest are `dtype`)."""


def _compile(kernel, dtype: str, constexprs: dict, arch: int, state: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "state_ptr":
            signature[name] = f"*{state}"
        elif name in POINTER_TYPES:
            signature[name] = POINTER_TYPES[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    src = ASTSource(kernel, signature, constexprs={(index[k],): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"]


# name -> (kernel name, activation dtype, state dtype, constexprs, arch)
CASES = {
    "gdn_chunk-bf16-k128-sm90": (
        "chunk",
        "bf16",
        "bf16",
        {"HAS_STATE": True, "BLOCK_T": 32, "BLOCK_K": 128, "BLOCK_V": 32},
        90,
    ),
    "gdn_chunk-fp16-k64-nostate-sm80": (
        "chunk",
        "fp16",
        "fp16",
        {"HAS_STATE": False, "BLOCK_T": 32, "BLOCK_K": 64, "BLOCK_V": 64},
        80,
    ),
    "gdn_chunk-fp32-k16-sm90": (
        "chunk",
        "fp32",
        "fp32",
        {"HAS_STATE": True, "BLOCK_T": 16, "BLOCK_K": 16, "BLOCK_V": 16},
        90,
    ),
    "gdn_step-bf16-k128-sm90": ("step", "bf16", "bf16", {"BLOCK_K": 128, "BLOCK_V": 32}, 90),
    "gdn_step-fp32-k64-sm80": ("step", "fp32", "fp32", {"BLOCK_K": 64, "BLOCK_V": 64}, 80),
    "conv_prefill-bf16-sm90": (
        "conv_prefill",
        "bf16",
        "bf16",
        {
            "K": 4,
            "BLOCK_K": 4,
            "HAS_BIAS": False,
            "HAS_STATE": True,
            "BLOCK_D": 64,
            "BLOCK_L": 16,
        },
        90,
    ),
    "conv_update-bf16-sm90": (
        "conv_update",
        "bf16",
        "bf16",
        {"K": 4, "BLOCK_K": 4, "HAS_BIAS": False, "BLOCK_D": 128},
        90,
    ),
}


def _kernels() -> dict:
    from splitserve.kernels import causal_conv1d, gated_delta

    return {
        "chunk": gated_delta._gdn_chunk_kernel,
        "step": gated_delta._gdn_recurrent_kernel,
        "conv_prefill": causal_conv1d._conv_prefill_kernel,
        "conv_update": causal_conv1d._conv_update_kernel,
    }


def _compile_all() -> dict[str, str]:
    """Child process body: compile every case, return name -> "ok" or the error text."""
    kernels = _kernels()
    results = {}
    for name, (kernel, dtype, state, meta, arch) in CASES.items():
        try:
            _compile(kernels[kernel], dtype, meta, arch, state)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - report every case, not just the first failure
            results[name] = traceback.format_exc(limit=3)
    return results


@pytest.fixture(scope="module")
def compile_report() -> dict[str, str]:
    pytest.importorskip("triton")
    import torch

    if torch.cuda.is_available():
        # There test_kernel_gdn.py compiles and runs them on the device (and gpu_check.sh's
        # kernel_tests step has no time to spare).
        pytest.skip("a CUDA device compiles these kernels for real")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, "-P", __file__, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/tmp",
    )
    if proc.returncode != 0:
        pytest.fail(f"compile child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_compiles_for_gpu(compile_report, case):
    assert compile_report[case] == "ok", compile_report[case]


if __name__ == "__main__":
    report = _compile_all()
    if "--json" in sys.argv:
        print(json.dumps(report))
    else:
        for name, status in report.items():
            print(f"{name}: {status}")
