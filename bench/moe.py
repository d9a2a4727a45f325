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

    python bench/moe.py            # full run
    python bench/moe.py --quick    # fewer repetitions
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 15
    torch.manual_seed(0)
    with torch.inference_mode():
        bench_cpu(reps)
        if torch.cuda.is_available():
            bench_cuda(reps)
        else:
            print("no CUDA device: the Triton kernel is not timed")


if __name__ == "__main__":
    main()
