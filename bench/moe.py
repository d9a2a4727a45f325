"""Sparse MoE layer benchmark, reported as ratios measured in the same run.

CPU (always): the grouped torch path (`kernels.torch_moe`, each expert on its routed tokens)
against a dense all-experts computation of the same layer (every expert on every token, the
result masked by the routing weights), on Mixtral-shaped proportions scaled down (hidden 512,
intermediate 1792, 8 experts, top-2) at 1, 16 and 256 tokens. The grouped path does
top_k / num_experts of the dense FLOPs, so its speed-up should approach 4x as tokens grow.

CUDA (when present): the Triton kernel (`kernels.fused_moe`) against the torch grouped path,
and against one dense bf16 matmul pair of the same FLOPs (T * top_k rows through one
expert's weights: the matrix-rate ceiling), at Mixtral-8x7B layer shapes (hidden 4096,
intermediate 14336, 8 experts, top-2).

MXFP4 (CUDA, `--mxfp4`): the MXFP4 Triton kernel (`kernels.mxfp4_moe`, FP4 experts decoded in
the GEMM's load stage) against the bf16 Triton kernel on the same layer at gpt-oss-20b shapes
(hidden 2880, intermediate 2880, 32 experts, top-4, biases and the clamped SwiGLU). Decode
steps read every routed expert's weights, which MXFP4 holds in 0.53 bytes a value against
bf16's 2, so small token counts should approach 3.8x; large ones are compute-bound.

Grouped GEMM (`--grouped`): the MoE on the grouped GEMM (`kernels.grouped_moe`, masked
layout up to 64 tokens, contiguous past them) against the fused kernel (`kernels.fused_moe`)
and the torch per-expert loop (`torch_moe`), bf16 at Mixtral-8x7B shapes; and block-scaled FP8
experts on the FP8 grouped GEMM against the bf16 grouped GEMM on the same dequantized weights
at DeepSeek-V3-like expert shapes (hidden 7168, intermediate 2048, 64 experts, top-6, 128x128
blocks; FP8 needs capability >= 8.9). Without CUDA it runs tiny shapes in the Triton
interpreter (TRITON_INTERPRET=1) and checks the outputs agree: no timings.

    python bench/moe.py            # full run
    python bench/moe.py --quick    # fewer repetitions
    python bench/moe.py --mxfp4    # MXFP4 vs bf16 experts only (CUDA)
    python bench/moe.py --grouped  # grouped GEMM vs fused kernel vs torch loop; FP8 vs bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitserve.kernels.torch_moe import fused_moe_torch


def _time(fns: list[Callable[[], object]], reps: int, sync: Callable[[], None]) -> list[float]:
    """Median seconds of one call of each function, after a warm-up call. The functions run
    in turn within each repetition, so load from other processes hits them alike."""
    for fn in fns:
        fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _inputs(tokens, hidden, inter, experts, top_k, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.02).to(device, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) * 0.02).to(device, dtype)
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    weights, ids = torch.softmax(logits, -1).topk(top_k, -1)
    return x, w13, w2, weights, ids


def _dense(x, w13, w2, weights, ids):
    """Every expert on every token; tokens not routed to an expert get weight 0."""
    full = torch.zeros(x.shape[0], w13.shape[0], dtype=x.dtype, device=x.device)
    full.scatter_(1, ids, weights.to(x.dtype))
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        gate, up = F.linear(x, w13[e]).chunk(2, dim=-1)
        out += full[:, e : e + 1] * F.linear(F.silu(gate) * up, w2[e])
    return out


def bench_cpu(reps: int) -> None:
    print("CPU fp32: grouped torch path vs dense all-experts (hidden 512, inter 1792, 8x top-2)")
    for tokens in (1, 16, 256):
        args = _inputs(tokens, 512, 1792, 8, 2, torch.float32, "cpu")
        grouped, dense = _time(
            [lambda a=args: fused_moe_torch(*a), lambda a=args: _dense(*a)], reps, lambda: None
        )
        print(
            f"  tokens {tokens:4d}: grouped {grouped * 1e3:8.2f} ms, dense {dense * 1e3:8.2f} ms,"
            f" speed-up {dense / grouped:5.2f}x"
        )


def bench_cuda(reps: int) -> None:
    from splitserve.kernels.fused_moe import fused_moe

    sync = torch.cuda.synchronize
    hidden, inter = 4096, 14336
    print(f"CUDA bf16: Mixtral-8x7B layer (hidden {hidden}, inter {inter}, 8x top-2)")
    for tokens in (1, 16, 256, 2048):
        args = _inputs(tokens, hidden, inter, 8, 2, torch.bfloat16, "cuda")
        x, w13, w2 = args[:3]
        rows = x.new_empty(tokens * 2, hidden)
        triton_s, torch_s, ceiling = _time(
            [
                lambda a=args: fused_moe(*a),
                lambda a=args: fused_moe_torch(*a),
                lambda r=rows, a=w13[0], b=w2[0]: F.linear(F.linear(r, a)[:, :inter], b),
            ],
            reps,
            sync,
        )
        print(
            f"  tokens {tokens:5d}: triton {triton_s * 1e3:7.3f} ms, torch grouped "
            f"{torch_s * 1e3:7.3f} ms ({torch_s / triton_s:4.2f}x), dense same-FLOPs "
            f"{ceiling * 1e3:7.3f} ms ({ceiling / triton_s:4.2f} of ceiling)"
        )


def _mxfp4_inputs(tokens, hidden, inter, experts, top_k, device):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def packed(n, k):
        blocks = torch.randint(0, 256, (experts, n, k // 32, 16), generator=gen, dtype=torch.uint8)
        scales = torch.randint(118, 122, (experts, n, k // 32), generator=gen, dtype=torch.uint8)
        return blocks.to(device), scales.to(device)

    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    top, ids = logits.topk(top_k, -1)
    extra = dict(
        b13=torch.zeros(experts, 2 * inter, dtype=torch.bfloat16, device=device),
        b2=torch.zeros(experts, hidden, dtype=torch.bfloat16, device=device),
        swiglu_limit=7.0,
    )
    return x, packed(2 * inter, hidden), packed(hidden, inter), torch.softmax(top, -1), ids, extra


def bench_cuda_mxfp4(reps: int) -> None:
    hidden = inter = 2880
    experts, top_k = 32, 4
    print(
        f"CUDA: MXFP4 vs bf16 experts, gpt-oss-20b layer (hidden {hidden}, {experts}x top-{top_k})"
    )
    for tokens in (1, 16, 256, 2048):
        mx_s, bf16_s = _time_mxfp4(tokens, hidden, inter, experts, top_k, reps)
        print(
            f"  tokens {tokens:5d}: mxfp4 {mx_s * 1e3:7.3f} ms, bf16 {bf16_s * 1e3:7.3f} ms,"
            f" speed-up {bf16_s / mx_s:5.2f}x"
        )


def _time_mxfp4(tokens, hidden, inter, experts, top_k, reps) -> list[float]:
    """(MXFP4 kernel, bf16 kernel on the same weights dequantized) median seconds."""
    from splitserve.kernels.fused_moe import fused_moe
    from splitserve.kernels.mxfp4_moe import fused_moe_mxfp4
    from splitserve.kernels.torch_mxfp4 import dequantize_mxfp4

    x, w13, w2, weights, ids, extra = _mxfp4_inputs(tokens, hidden, inter, experts, top_k, "cuda")
    d13 = dequantize_mxfp4(*w13, torch.bfloat16)
    d2 = dequantize_mxfp4(*w2, torch.bfloat16)
    return _time(
        [
            lambda: fused_moe_mxfp4(x, *w13, *w2, weights, ids, **extra),
            lambda: fused_moe(x, d13, d2, weights, ids, **extra),
        ],
        reps,
        torch.cuda.synchronize,
    )


def _fp8_stack(experts, n, k, block, device):
    from splitserve.kernels.reference import fp8_dequantize_ref

    weight = (torch.randn(experts, n, k, device=device) * 2).to(torch.float8_e4m3fn)
    scale = torch.rand(experts, -(-n // block[0]), -(-k // block[1]), device=device) * 1e-3
    dense = torch.stack([fp8_dequantize_ref(weight[e], scale[e], block) for e in range(experts)])
    return weight, scale, dense.to(torch.bfloat16)


def bench_grouped(reps: int, sizes: tuple[int, ...]) -> None:
    from splitserve.kernels.fused_moe import fused_moe
    from splitserve.kernels.grouped_moe import choose_layout, grouped_moe

    sync = torch.cuda.synchronize
    hidden, inter, experts, top_k = 4096, 14336, 8, 2
    print(f"CUDA bf16: grouped GEMM vs fused kernel vs torch loop (hidden {hidden}, inter {inter}, {experts}x top-{top_k})")  # fmt: skip
    for tokens in sizes:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02
        weights, ids = torch.softmax(torch.randn(tokens, experts, device="cuda"), -1).topk(top_k)
        args = (x, w13, w2, weights, ids)
        grouped_s, fused_s, loop_s = _time(
            [
                lambda a=args: grouped_moe(*a),
                lambda a=args: fused_moe(*a),
                lambda a=args: fused_moe_torch(*a),
            ],
            reps,
            sync,
        )
        print(
            f"  tokens {tokens:5d} ({choose_layout(tokens, experts):10s}): grouped "
            f"{grouped_s * 1e3:7.3f} ms, fused {fused_s * 1e3:7.3f} ms "
            f"({fused_s / grouped_s:4.2f}x), torch loop {loop_s * 1e3:7.3f} ms "
            f"({loop_s / grouped_s:4.2f}x)"
        )
        del w13, w2
    if torch.cuda.get_device_capability() < (8, 9):
        print("FP8 grouped GEMM: skipped (needs FP8 tensor cores, capability >= 8.9)")
        return
    hidden, inter, experts, top_k, block = 7168, 2048, 64, 6, (128, 128)
    w13, s13, d13 = _fp8_stack(experts, 2 * inter, hidden, block, "cuda")
    w2, s2, d2 = _fp8_stack(experts, hidden, inter, block, "cuda")
    print(f"CUDA: FP8 block-scaled vs bf16 grouped GEMM (hidden {hidden}, inter {inter}, {experts}x top-{top_k})")  # fmt: skip
    fp8 = dict(w13_scale=s13, w2_scale=s2, block=block)
    for tokens in sizes:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        weights, ids = torch.softmax(torch.randn(tokens, experts, device="cuda"), -1).topk(top_k)
        routed = (x, weights, ids)
        fp8_s, bf16_s = _time(
            [
                lambda r=routed: grouped_moe(r[0], w13, w2, *r[1:], **fp8),
                lambda r=routed: grouped_moe(r[0], d13, d2, *r[1:]),
            ],
            reps,
            sync,
        )
        print(
            f"  tokens {tokens:5d}: fp8 {fp8_s * 1e3:7.3f} ms, bf16 {bf16_s * 1e3:7.3f} ms,"
            f" speed-up {bf16_s / fp8_s:5.2f}x"
        )


def check_grouped_interpreted() -> None:
    """No CUDA: the grouped and fused kernels in the interpreter on tiny shapes, compared."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--grouped without CUDA needs TRITON_INTERPRET=1 (a correctness check)")
    from splitserve.kernels.fused_moe import fused_moe
    from splitserve.kernels.grouped_moe import grouped_moe

    print("no CUDA device: interpreter check of the grouped GEMM MoE (no timings)")
    for tokens in (3, 80):
        args = _inputs(tokens, 32, 24, 8, 2, torch.float32, "cpu")
        diff = (grouped_moe(*args) - fused_moe(*args)).abs().max().item()
        print(f"  tokens {tokens:3d}: max |grouped - fused| = {diff:.2e}")
        if diff > 1e-4:
            raise SystemExit("the grouped GEMM MoE disagrees with the fused kernel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--mxfp4", action="store_true", help="MXFP4 vs bf16 experts (CUDA) only")
    parser.add_argument(
        "--grouped", action="store_true", help="grouped GEMM vs fused kernel; FP8 vs bf16 (CUDA)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 15
    torch.manual_seed(0)
    with torch.inference_mode():
        if args.grouped:
            if not torch.cuda.is_available():
                check_grouped_interpreted()
                return
            bench_grouped(reps, (1, 64, 2048) if args.quick else (1, 16, 64, 256, 2048))
            return
        if args.mxfp4:
            if not torch.cuda.is_available():
                raise SystemExit("--mxfp4 needs a CUDA device (the kernel is GPU-only)")
            bench_cuda_mxfp4(reps)
            return
        bench_cpu(reps)
        if torch.cuda.is_available():
            bench_cuda(reps)
        else:
            print("no CUDA device: the Triton kernel is not timed")


if __name__ == "__main__":
    main()
