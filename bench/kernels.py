"""Kernel benchmarks, reported as ratios to ceilings measured in the same run.

On a CUDA device: each Triton kernel's achieved bytes/s against a device-to-device copy
(memory-bound kernels: decode attention, KV write, RMSNorm, rotary, SiLU-and-mul, bitmask),
and prefill attention's FLOP/s against a dense fp16 matmul. The headline case is decode
attention at batch 64, context 2048 (Llama-3-8B heads: 32 query / 8 KV, head dim 128, fp16).

Without CUDA it says so, then times the CPU torch paths against the plain references on small
shapes (and CPU decode attention against a CPU memcpy), and exits 0.

    python bench/kernels.py            # full run
    python bench/kernels.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from splitserve.kernels import reference as ref
from splitserve.kernels.torch_attention import paged_attention_torch


@dataclass
class PagedInputs:
    q: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.q,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.seq_lens,
            self.cu_seqlens_q,
        )


def make_paged(
    batch: int,
    context: int,
    query_len: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> PagedInputs:
    """A uniform batch with shuffled block ids; seq_len = context + query_len."""
    seq_len = context + query_len
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = batch * blocks_per_seq
    ids = torch.randperm(num_blocks, device=device, dtype=torch.int64).to(torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return PagedInputs(
        q=torch.randn(batch * query_len, num_heads, head_dim, device=device, dtype=dtype),
        key_cache=torch.randn(shape, device=device, dtype=dtype),
        value_cache=torch.randn(shape, device=device, dtype=dtype),
        block_tables=ids.view(batch, blocks_per_seq).contiguous(),
        seq_lens=torch.full((batch,), seq_len, device=device, dtype=torch.int32),
        cu_seqlens_q=torch.arange(0, batch + 1, device=device, dtype=torch.int32) * query_len,
    )


def cpu_time(fn: Callable[[], object], reps: int) -> float:
    """Median wall seconds of fn over reps runs after one warm-up."""
    return cpu_times(fn, fn, reps)[0]


def cpu_times(
    fn_a: Callable[[], object], fn_b: Callable[[], object], reps: int
) -> tuple[float, float]:
    """Median wall seconds of two functions timed alternately, so drifting load on a shared
    host hits both alike."""
    fn_a()
    fn_b()
    times_a, times_b = [], []
    for _ in range(reps):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times_a), statistics.median(times_b)


# --------------------------------------------------------------------------- CPU


def bench_cpu(reps: int) -> None:
    print("== CPU: torch paths vs plain references (speed-up = reference time / path time)")
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    heads = dict(num_heads=8, num_kv_heads=2, head_dim=64, block_size=16)

    decode = make_paged(32, 512, 1, dtype=torch.float32, device=cpu, **heads)
    t_ref, t_path = cpu_times(
        lambda: ref.paged_attention_ref(*decode.args(), 0.125),
        lambda: paged_attention_torch(*decode.args(), 0.125),
        reps,
    )
    print(f"decode attention  b=32 ctx=512 : ref {t_ref * 1e3:8.2f} ms  torch path "
          f"{t_path * 1e3:8.2f} ms  speed-up {t_ref / t_path:5.2f}x")  # fmt: skip

    kv_bytes = 2 * decode.key_cache.numel() * decode.key_cache.element_size()
    src = torch.empty(kv_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_copy, t_path = cpu_times(
        lambda: dst.copy_(src), lambda: paged_attention_torch(*decode.args(), 0.125), reps
    )
    copy_bw = 2 * kv_bytes / t_copy
    attn_bw = kv_bytes / t_path
    print(f"decode attention  bytes/s {attn_bw / 1e9:6.2f} GB/s vs CPU copy "
          f"{copy_bw / 1e9:6.2f} GB/s  ratio {attn_bw / copy_bw:5.2f}")  # fmt: skip

    prefill = make_paged(4, 128, 128, dtype=torch.float32, device=cpu, **heads)
    t_ref, t_path = cpu_times(
        lambda: ref.paged_attention_ref(*prefill.args(), 0.125),
        lambda: paged_attention_torch(*prefill.args(), 0.125),
        reps,
    )
    print(f"prefill attention b=4 q=128 ctx=128: ref {t_ref * 1e3:8.2f} ms  torch path "
          f"{t_path * 1e3:8.2f} ms  speed-up {t_ref / t_path:5.2f}x")  # fmt: skip
    print("(rms_norm, rotary, activations, bitmask and the KV write use the vectorised "
          "references as their CPU path: ratio 1 by construction)")  # fmt: skip


# --------------------------------------------------------------------------- GPU


def gpu_time(fn: Callable[[], object], reps: int) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(dev: torch.device, reps: int) -> float:
    """Bytes/s (read + write) of a 1 GiB device-to-device copy: the memory-bound ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / gpu_time(lambda: dst.copy_(src), reps)


def bench_gpu(reps: int) -> None:
    from splitserve.kernels import activation, kv_cache, rms_norm, rotary_kernel, token_bitmask
    from splitserve.kernels.attention_decode import paged_attention_decode
    from splitserve.kernels.attention_prefill import paged_attention_prefill
    from splitserve.kernels.rotary import build_cos_sin_cache

    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"== GPU: {torch.cuda.get_device_name(dev)}")
    copy_bw = copy_bandwidth(dev, reps)
    print(f"device-to-device copy: {copy_bw / 1e9:8.1f} GB/s (read + write)")

    def report(name: str, nbytes: float, seconds: float) -> None:
        bw = nbytes / seconds
        print(f"{name:40s} {seconds * 1e6:9.1f} us {bw / 1e9:8.1f} GB/s  ratio {bw / copy_bw:5.2f}")

    heads = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
    dt = torch.float16
    for batch, ctx in ((64, 2048), (1, 32768), (256, 512)):
        p = make_paged(batch, ctx - 1, 1, dtype=dt, device=dev, **heads)
        kv = 2 * batch * ctx * 8 * 128 * 2  # K and V bytes actually read
        io = 2 * p.q.numel() * 2
        t = gpu_time(
            lambda p=p, ctx=ctx: paged_attention_decode(*p.args(), 0.088, max_seq_len=ctx), reps
        )  # noqa: E501
        report(f"decode attention b={batch} ctx={ctx}", kv + io, t)

    a = torch.randn(8192, 8192, device=dev, dtype=dt)
    t_mm = gpu_time(lambda: a @ a, reps)
    mm_rate = 2 * 8192**3 / t_mm
    print(f"dense fp16 matmul 8192^3: {mm_rate / 1e12:8.1f} TFLOP/s")
    p = make_paged(8, 0, 2048, dtype=dt, device=dev, **heads)
    flops = 8 * 4 * (2048 * 2049 / 2) * 32 * 128  # causal: QK^T and PV over the lower triangle
    t = gpu_time(lambda: paged_attention_prefill(*p.args(), 0.088, max_query_len=2048), reps)
    print(f"{'prefill attention 8 x 2048 causal':40s} {t * 1e6:9.1f} us {flops / t / 1e12:8.1f} "
          f"TFLOP/s ratio {flops / t / mm_rate:5.2f}")  # fmt: skip

    tokens, hidden, inter = 8192, 4096, 14336
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    res, w = torch.randn_like(x), torch.randn(hidden, device=dev, dtype=dt)
    t = gpu_time(lambda: rms_norm.fused_add_rms_norm(x, res, w, 1e-5), reps)
    report("fused_add_rms_norm 8192x4096", 4 * x.numel() * 2, t)
    g = torch.randn(tokens, 2 * inter, device=dev, dtype=dt)
    t = gpu_time(lambda: activation.silu_and_mul(g), reps)
    report("silu_and_mul 8192x(2x14336)", 1.5 * g.numel() * 2, t)
    q = torch.randn(tokens, 32, 128, device=dev, dtype=dt)
    k = torch.randn(tokens, 8, 128, device=dev, dtype=dt)
    pos = torch.randint(0, 8192, (tokens,), device=dev)
    cache = build_cos_sin_cache({"rope_theta": 500000.0}, 128, 8192, device=dev)
    t = gpu_time(lambda: rotary_kernel.apply_rotary(pos, q, k, cache), reps)
    report("rotary q32/k8 x128, 8192 tokens", 2 * (q.numel() + k.numel()) * 2, t)
    kc = torch.empty(tokens // 16 + 1, 16, 8, 128, device=dev, dtype=dt)
    vc = torch.empty_like(kc)
    slots = torch.randperm(tokens, device=dev)
    t = gpu_time(lambda: kv_cache.write_kv_cache(k, k, kc, vc, slots), reps)
    report("write_kv_cache 8192 tokens", 4 * k.numel() * 2, t)
    logits = torch.randn(256, 128256, device=dev, dtype=torch.float32)
    mask = torch.randint(-(2**31), 2**31, (256, 4008), device=dev, dtype=torch.int64).int()
    t = gpu_time(lambda: token_bitmask.apply_token_bitmask(logits, mask), reps)
    report("apply_token_bitmask 256x128256", logits.numel() * 4 * 1.5 + mask.numel() * 4, t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    reps = 5 if args.quick else 20
    if torch.cuda.is_available():
        bench_gpu(reps)
    else:
        print("No CUDA GPU found: GPU kernel figures skipped; running the CPU comparisons only.")
    bench_cpu(max(3, reps // 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
