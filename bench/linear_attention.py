"""Linear-attention benchmarks, reported as ratios measured in the same run. Each model family
is one part (`PARTS`); `--part` picks some, all run by default.

gdn (gated delta net, Qwen3-Next):
  CPU (unless --gpu-only):
    - the chunked gated delta rule (`torch_gdn.chunk_gated_delta_rule_one`, chunk 64) against
      the step-by-step recurrence (`torch_gdn.gated_delta_recurrence`) over one long sequence;
    - decode step time of splitserve's in-process engine on a small random Qwen3-Next against
      transformers' cached generation of the same checkpoint (same prompt, greedy): per decode
      token, (time for N tokens - time for 1 token) / (N - 1), for each side.
  CUDA (when present, unless --cpu-only): the Triton chunked rule over packed sequences against
  its torch path on the same device and against the copy-bandwidth ceiling (a device copy of as
  many bytes as it reads and writes: q, k, v, g, beta in, o out, each sequence's state in and
  out); the fused recurrent step against a copy of the states it reads and writes.

lightning (lightning attention, MiniMax):
  CPU (unless --gpu-only):
    - the block-wise prefill (`torch_lightning.lightning_block_one`) against the step-by-step
      recurrence (`torch_lightning.lightning_recurrence`) over one long sequence;
    - decode step time of splitserve's in-process engine on a small random MiniMax (lightning and
      softmax layers, MoE) against transformers' cached generation of the same checkpoint (same
      prompt, greedy): per decode token, (time for N tokens - time for 1 token) / (N - 1).

  CUDA (when present, unless --cpu-only): the Triton block-wise prefill over packed sequences and
  the decode step over state slots, each against the copy-bandwidth ceiling (a device copy of as
  many bytes as the kernel must read and write), and the prefill against the torch path.

    python bench/linear_attention.py            # everything this machine can run
    python bench/linear_attention.py --quick    # fewer tokens and repetitions
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable

import torch

from splitserve.testing.bench_timing import decode_step_times, median_times


def _gdn_inputs(tokens: int, hk: int, hv: int, dk: int, dv: int, device, dtype):
    q = torch.randn(tokens, hk, dk, device=device, dtype=dtype)
    k = torch.randn(tokens, hk, dk, device=device, dtype=dtype)
    v = torch.randn(tokens, hv, dv, device=device, dtype=dtype)
    a = torch.randn(tokens, hv, device=device)
    g = -torch.rand(hv, device=device).add(0.1) * torch.nn.functional.softplus(a)
    beta = torch.sigmoid(torch.randn(tokens, hv, device=device))
    return q, k, v, g, beta


# ---------------------------------------------------------------------------- gdn, CPU


def gdn_cpu_chunk(quick: bool) -> None:
    from splitserve.kernels import torch_gdn

    length = 512 if quick else 2048
    hk, hv, dk, dv = 4, 8, 64, 64
    q, k, v, g, beta = _gdn_inputs(length, hk, hv, dk, dv, "cpu", torch.float32)
    init = torch.randn(hv, dk, dv) * 0.1
    chunk, step = median_times(
        [
            lambda: torch_gdn.chunk_gated_delta_rule_one(q, k, v, g, beta, 64, init),
            lambda: torch_gdn.gated_delta_recurrence(q, k, v, g, beta, init),
        ],
        2 if quick else 3,
        lambda: None,
    )
    print(
        f"cpu gated delta rule, {length} tokens, {hk}/{hv} q-k/v heads of 64: chunked (64) "
        f"{chunk * 1e3:.1f} ms, step-by-step {step * 1e3:.1f} ms, speed-up {step / chunk:.1f}x"
    )


def gdn_cpu_decode(quick: bool) -> None:
    from splitserve.testing.qwen3_next_model import build_qwen3_next

    tokens = 16 if quick else 48
    reps = 2 if quick else 4
    kinds = ("linear_attention", "linear_attention", "linear_attention", "full_attention")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_qwen3_next(
            f"{tmp}/m",
            hidden_size=256,
            layer_types=kinds,
            num_experts=8,
            linear_num_key_heads=4,
            linear_num_value_heads=8,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            head_dim=64,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
        )
        prompt = torch.randint(5, 900, (64,), generator=torch.Generator().manual_seed(0)).tolist()
        our_step, hf_step = decode_step_times(path, prompt, tokens, reps)
    print(
        f"cpu decode step (Qwen3-Next, hidden 256, 3 GDN + 1 attention layers, 8 experts; "
        f"batch 1): splitserve {our_step * 1e3:.2f} ms, transformers {hf_step * 1e3:.2f} ms, "
        f"ratio transformers/splitserve {hf_step / our_step:.2f}x"
    )


def gdn_cpu(quick: bool) -> None:
    gdn_cpu_chunk(quick)
    gdn_cpu_decode(quick)


# ---------------------------------------------------------------------------- gdn, GPU


GDN_SHAPES = (16, 32, 128, 128)
"""Qwen3-Next-80B-A3B's per-layer gated delta net shapes: (Hk, Hv, Dk, Dv)."""


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def _gdn_gpu_chunk(
    num_seqs: int,
    length: int,
    reps: int,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    shapes: tuple[int, int, int, int] = GDN_SHAPES,
) -> None:
    """(The tests run it on CPU under the Triton interpreter with small shapes.)"""
    from splitserve.kernels import gated_delta, torch_gdn

    device = torch.device(device)
    hk, hv, dk, dv = shapes
    tokens = num_seqs * length
    q, k, v, g, beta = _gdn_inputs(tokens, hk, hv, dk, dv, device, dtype)
    states = torch.zeros(num_seqs, hv, dk, dv, device=device, dtype=dtype)
    cu = torch.arange(0, tokens + 1, length, device=device, dtype=torch.int32)
    slots = torch.arange(num_seqs, device=device)
    init = torch.ones(num_seqs, dtype=torch.bool, device=device)
    moved = q.nbytes + k.nbytes + 2 * v.nbytes + g.nbytes + beta.nbytes + 2 * states.nbytes
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cu_list, slot_list, init_list = cu.tolist(), slots.tolist(), init.tolist()
    triton_t, torch_t, copy = median_times(
        [
            lambda: gated_delta.chunk_gated_delta_rule(q, k, v, g, beta, states, cu, slots, init),
            lambda: torch_gdn.chunk_gated_delta_rule(
                q, k, v, g, beta, states, cu_list, slot_list, init_list
            ),
            lambda: dst.copy_(src),
        ],
        reps,
        _sync(device),
    )
    print(
        f"{device.type} gated delta rule {num_seqs}x{length} tokens ({hk}/{hv} heads of "
        f"{dk}/{dv}, {str(dtype).removeprefix('torch.')}): triton {triton_t * 1e3:.3f} ms ({moved / triton_t / 1e9:.0f} GB/s), torch path "
        f"{torch_t * 1e3:.3f} ms (torch/triton {torch_t / triton_t:.1f}x); copy of the same "
        f"bytes {copy * 1e3:.3f} ms, triton/copy {triton_t / copy:.1f}x"
    )


def _gdn_gpu_step(
    batch: int,
    reps: int,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    shapes: tuple[int, int, int, int] = GDN_SHAPES,
) -> None:
    from splitserve.kernels import gated_delta

    device = torch.device(device)
    hk, hv, dk, dv = shapes
    q, k, v, g, beta = _gdn_inputs(batch, hk, hv, dk, dv, device, dtype)
    states = torch.randn(batch, hv, dk, dv, device=device, dtype=dtype)
    slots = torch.randperm(batch, device=device)
    src = torch.empty(states.nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    step, copy = median_times(
        [
            lambda: gated_delta.fused_recurrent_gated_delta_rule(q, k, v, g, beta, states, slots),
            lambda: dst.copy_(src),
        ],
        reps,
        _sync(device),
    )
    print(
        f"{device.type} gated delta step, batch {batch}: {step * 1e6:.1f} us, "
        f"{2 * states.nbytes / step / 1e9:.0f} GB/s; copy of the states {copy * 1e6:.1f} us; "
        f"step/copy {step / copy:.1f}x"
    )


def gdn_gpu(quick: bool) -> None:
    reps = 5 if quick else 20
    for num_seqs, length in ((4, 1024),) if quick else ((4, 2048), (32, 512)):
        _gdn_gpu_chunk(num_seqs, length, reps)
    for batch in (1, 64) if quick else (1, 64, 256):
        _gdn_gpu_step(batch, reps)


# ------------------------------------------------------------------ lightning attention: CPU


def lightning_cpu_prefill(quick: bool) -> None:
    from splitserve.kernels import torch_lightning

    length = 512 if quick else 2048
    heads, head_dim = 8, 128
    q, k = (torch.randn(length, heads, head_dim) / head_dim**0.5 for _ in range(2))
    v = torch.randn(length, heads, head_dim)
    slope = (0.5 ** (8 / heads)) ** (torch.arange(heads, dtype=torch.float32) + 1)
    init = torch.randn(heads, head_dim, head_dim)
    block, step = median_times(
        [
            lambda: torch_lightning.lightning_block_one(q, k, v, slope, 256, init),
            lambda: torch_lightning.lightning_recurrence(q, k, v, slope, init),
        ],
        2 if quick else 3,
        lambda: None,
    )
    print(
        f"cpu lightning prefill, {length} tokens, 8x128 heads: block-wise (256) "
        f"{block * 1e3:.1f} ms, step-by-step {step * 1e3:.1f} ms, speed-up {step / block:.1f}x"
    )


def lightning_cpu_decode(quick: bool) -> None:
    from splitserve.testing.minimax_model import build_minimax

    tokens = 16 if quick else 48
    reps = 2 if quick else 4
    with tempfile.TemporaryDirectory() as tmp:
        path = build_minimax(
            f"{tmp}/m",
            hidden_size=256,
            layer_types=(
                "linear_attention",
                "linear_attention",
                "linear_attention",
                "full_attention",
            ),  # fmt: skip
            num_heads=4,
            num_kv_heads=4,
            head_dim=64,
            num_experts=4,
            top_k=2,
            block_size=64,
        )
        prompt = torch.randint(5, 900, (64,), generator=torch.Generator().manual_seed(0)).tolist()
        our_step, hf_step = decode_step_times(path, prompt, tokens, reps)
    print(
        f"cpu MiniMax decode step (hidden 256, 3 lightning + 1 softmax layers, 4x64 heads, "
        f"4 experts top-2; batch 1): splitserve {our_step * 1e3:.2f} ms, transformers "
        f"{hf_step * 1e3:.2f} ms, ratio transformers/splitserve {hf_step / our_step:.2f}x"
    )


# ------------------------------------------------------------------ lightning attention: GPU


LIGHTNING_HEADS, LIGHTNING_HEAD_DIM = 64, 128
"""MiniMax-Text-01's lightning layer shapes (one rank, no tensor parallelism)."""


def _slopes(device: torch.device) -> torch.Tensor:
    h = LIGHTNING_HEADS
    return (0.5 ** (8 / h)) ** (torch.arange(h, dtype=torch.float32, device=device) + 1)


def _lightning_gpu_prefill(num_seqs: int, length: int, reps: int) -> None:
    from splitserve.kernels import lightning_attention, torch_lightning

    device, dtype = torch.device("cuda"), torch.bfloat16
    tokens, h, d = num_seqs * length, LIGHTNING_HEADS, LIGHTNING_HEAD_DIM
    q, k, v = (torch.randn(tokens, h, d, device=device, dtype=dtype) * 0.1 for _ in range(3))
    slope = _slopes(device)
    states = torch.zeros(num_seqs, h, d, d, device=device, dtype=torch.float32)
    cu = torch.arange(0, tokens + 1, length, device=device, dtype=torch.int32)
    slots = torch.arange(num_seqs, device=device)
    init = torch.ones(num_seqs, dtype=torch.bool, device=device)
    moved = q.nbytes * 4 + 2 * states.nbytes
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cu_l, slots_l, init_l = cu.tolist(), slots.tolist(), init.tolist()
    kernel, copy, torch_path = median_times(
        [
            lambda: lightning_attention.lightning_prefill(q, k, v, slope, states, cu, slots, init),
            lambda: dst.copy_(src),
            lambda: torch_lightning.lightning_prefill(
                q, k, v, slope, 256, states, cu_l, slots_l, init_l
            ),
        ],
        reps,
        torch.cuda.synchronize,
    )
    print(
        f"gpu lightning prefill {num_seqs}x{length} tokens (64x128 heads, bf16, fp32 state): "
        f"{kernel * 1e3:.3f} ms, {moved / kernel / 1e9:.0f} GB/s; copy of the same bytes "
        f"{copy * 1e3:.3f} ms (kernel/copy {kernel / copy:.1f}x); torch path "
        f"{torch_path * 1e3:.3f} ms (torch/triton {torch_path / kernel:.1f}x)"
    )


def _lightning_gpu_decode(batch: int, reps: int) -> None:
    from splitserve.kernels import lightning_attention

    device, dtype = torch.device("cuda"), torch.bfloat16
    h, d = LIGHTNING_HEADS, LIGHTNING_HEAD_DIM
    states = torch.randn(batch, h, d, d, device=device)
    q, k, v = (torch.randn(batch, h, d, device=device, dtype=dtype) for _ in range(3))
    slope = _slopes(device)
    slots = torch.randperm(batch, device=device)
    moved = 2 * states.nbytes
    src = torch.empty(states.nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    upd, copy = median_times(
        [
            lambda: lightning_attention.lightning_decode(q, k, v, slope, states, slots),
            lambda: dst.copy_(src),
        ],
        reps,
        torch.cuda.synchronize,
    )
    print(
        f"gpu lightning decode, batch {batch}: {upd * 1e6:.1f} us, {moved / upd / 1e9:.0f} GB/s; "
        f"copy of the states {copy * 1e6:.1f} us; decode/copy {upd / copy:.1f}x"
    )


def lightning_gpu(quick: bool) -> None:
    reps = 5 if quick else 20
    for num_seqs, length in ((4, 1024),) if quick else ((4, 4096), (32, 512)):
        _lightning_gpu_prefill(num_seqs, length, reps)
    for batch in (1, 64) if quick else (1, 64, 256):
        _lightning_gpu_decode(batch, reps)


def lightning_cpu(quick: bool) -> None:
    lightning_cpu_prefill(quick)
    lightning_cpu_decode(quick)


PARTS: dict[str, tuple[Callable[[bool], None], Callable[[bool], None]]] = {
    "gdn": (gdn_cpu, gdn_gpu),
    "lightning": (lightning_cpu, lightning_gpu),
}
"""Part name -> (CPU benchmark, GPU benchmark), each taking `quick`."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA part")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU part")
    parser.add_argument(
        "--part", choices=sorted(PARTS), action="append", help="run only these parts"
    )
    args = parser.parse_args()
    if args.cpu_only and args.gpu_only:
        parser.error("--cpu-only and --gpu-only exclude each other")
    for name in args.part or list(PARTS):
        cpu, gpu = PARTS[name]
        if not args.gpu_only:
            cpu(args.quick)
        if not args.cpu_only:
            if torch.cuda.is_available():
                gpu(args.quick)
            else:
                print(f"gpu ({name}): no CUDA device; the GPU part did not run")


if __name__ == "__main__":
    main()
