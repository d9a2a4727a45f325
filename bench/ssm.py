"""Mamba2 (SSD) benchmark, reported as ratios measured in the same run.

CPU (unless --gpu-only):
  - decode step time of splitserve's in-process engine on a small random Mamba2 against
    transformers' cached generation of the same checkpoint (the same prompt, greedy): per
    decode token, (time for N tokens - time for 1 token) / (N - 1), for each side;
  - the chunked SSD scan (`torch_mamba.ssd_chunk_scan_one`) against the step-by-step
    recurrence (`torch_mamba.ssd_recurrence`) over one long sequence.

CUDA (when present, unless --cpu-only): the Triton SSD scan over packed sequences and the
one-step state update, each against the copy-bandwidth ceiling: a device copy of as many
bytes as the kernel must read and write (tokens' x, dt, B, C in and y out; for the update,
every slot's state in and out).

    python bench/ssm.py            # everything this machine can run
    python bench/ssm.py --quick    # fewer tokens and repetitions
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from splitserve.testing.bench_timing import decode_step_times, median_times

# ---------------------------------------------------------------------------- CPU


def cpu_decode(quick: bool) -> None:
    from splitserve.testing.mamba2_model import build_mamba2

    tokens = 16 if quick else 48
    reps = 2 if quick else 4
    with tempfile.TemporaryDirectory() as tmp:
        path = build_mamba2(
            f"{tmp}/m",
            hidden_size=256,
            num_heads=8,
            head_dim=64,
            state_size=64,
            n_groups=1,
            num_layers=4,
            chunk_size=64,
        )
        prompt = torch.randint(5, 900, (64,), generator=torch.Generator().manual_seed(0)).tolist()
        our_step, hf_step = decode_step_times(path, prompt, tokens, reps)
    print(
        f"cpu decode step (hidden 256, 4 layers, 8x64 heads, state 64; batch 1): "
        f"splitserve {our_step * 1e3:.2f} ms, transformers {hf_step * 1e3:.2f} ms, "
        f"ratio transformers/splitserve {hf_step / our_step:.2f}x"
    )


def cpu_scan(quick: bool) -> None:
    from splitserve.kernels import torch_mamba

    length = 512 if quick else 2048
    heads, head_dim, state, groups = 8, 64, 64, 1
    x = torch.randn(length, heads, head_dim)
    dt = torch.nn.functional.softplus(torch.randn(length, heads) - 2)
    A = -torch.rand(heads) - 0.1
    B = torch.randn(length, groups, state)
    C = torch.randn(length, groups, state)
    init = torch.randn(heads, head_dim, state)
    chunk, step = median_times(
        [
            lambda: torch_mamba.ssd_chunk_scan_one(x, dt, A, B, C, 64, init),
            lambda: torch_mamba.ssd_recurrence(x, dt, A, B, C, init),
        ],
        2 if quick else 3,
        lambda: None,
    )
    print(
        f"cpu SSD scan, {length} tokens, 8x64 heads, state 64: chunked (64) {chunk * 1e3:.1f} ms, "
        f"step-by-step {step * 1e3:.1f} ms, speed-up {step / chunk:.1f}x"
    )


# ---------------------------------------------------------------------------- GPU


HEADS, HEAD_DIM, STATE, GROUPS = 64, 64, 128, 8
"""Mamba2-2.7B-like per-layer shapes."""


def _gpu_scan(num_seqs: int, length: int, reps: int) -> None:
    from splitserve.kernels import ssd_scan

    device, dtype = torch.device("cuda"), torch.bfloat16
    tokens = num_seqs * length
    x = torch.randn(tokens, HEADS, HEAD_DIM, device=device, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(tokens, HEADS, device=device) - 2)
    A = -torch.rand(HEADS, device=device) - 0.1
    B = torch.randn(tokens, GROUPS, STATE, device=device, dtype=dtype)
    C = torch.randn(tokens, GROUPS, STATE, device=device, dtype=dtype)
    D = torch.randn(HEADS, device=device)
    states = torch.zeros(num_seqs, HEADS, HEAD_DIM, STATE, device=device)
    cu = torch.arange(0, tokens + 1, length, device=device, dtype=torch.int32)
    slots = torch.arange(num_seqs, device=device)
    init = torch.ones(num_seqs, dtype=torch.bool, device=device)
    moved = x.nbytes * 2 + dt.nbytes + B.nbytes + C.nbytes + 2 * states.nbytes
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    scan, copy = median_times(
        [
            lambda: ssd_scan.ssd_chunk_scan(x, dt, A, B, C, D, states, cu, slots, init),
            lambda: dst.copy_(src),
        ],
        reps,
        torch.cuda.synchronize,
    )
    print(
        f"gpu SSD scan {num_seqs}x{length} tokens (64x64 heads, state 128, bf16): "
        f"{scan * 1e3:.3f} ms, {moved / scan / 1e9:.0f} GB/s; copy of the same bytes "
        f"{copy * 1e3:.3f} ms; scan/copy {scan / copy:.1f}x"
    )


def _gpu_update(batch: int, reps: int) -> None:
    from splitserve.kernels import ssd_scan

    device, dtype = torch.device("cuda"), torch.bfloat16
    states = torch.randn(batch, HEADS, HEAD_DIM, STATE, device=device)
    x = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=dtype)
    dt = torch.rand(batch, HEADS, device=device)
    A = -torch.rand(HEADS, device=device) - 0.1
    B = torch.randn(batch, GROUPS, STATE, device=device, dtype=dtype)
    C = torch.randn(batch, GROUPS, STATE, device=device, dtype=dtype)
    D = torch.randn(HEADS, device=device)
    slots = torch.randperm(batch, device=device)
    moved = 2 * states.nbytes
    src = torch.empty(states.nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    upd, copy = median_times(
        [
            lambda: ssd_scan.selective_state_update(states, x, dt, A, B, C, D, slots),
            lambda: dst.copy_(src),
        ],
        reps,
        torch.cuda.synchronize,
    )
    print(
        f"gpu state update, batch {batch}: {upd * 1e6:.1f} us, {moved / upd / 1e9:.0f} GB/s; "
        f"copy of the states {copy * 1e6:.1f} us; update/copy {upd / copy:.1f}x"
    )


def gpu_kernels(quick: bool) -> None:
    reps = 5 if quick else 20
    for num_seqs, length in ((4, 1024),) if quick else ((4, 2048), (32, 512)):
        _gpu_scan(num_seqs, length, reps)
    for batch in (1, 64, 256):
        _gpu_update(batch, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA part")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU part")
    args = parser.parse_args()
    if not args.gpu_only:
        cpu_scan(args.quick)
        cpu_decode(args.quick)
    if not args.cpu_only:
        if torch.cuda.is_available():
            gpu_kernels(args.quick)
        else:
            print("gpu: no CUDA device; the GPU part did not run")


if __name__ == "__main__":
    main()
