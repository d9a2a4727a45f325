"""Quantized checkpoints: CPU step time of each FP8 and int4 format against the same model
unquantized, and (on CUDA) the W8A16 FP8 and W4A16 int4 GEMMs against the fp16 GEMM at decode
shapes.

    python bench/quant.py            # ~60M-param Llama (fp32 on CPU), batch 1 and 8
    python bench/quant.py --small    # a tiny model, one round (a quick check)
    python bench/quant.py --mxfp4    # gpt-oss: MXFP4 experts against the unquantized model

`--mxfp4` replaces the Llama variants with a random gpt-oss (sliding / full layers, 8 experts
top-2) saved unquantized and packed by `splitserve.testing.mxfp4_pack`; the CPU worker
dequantizes the experts at load, so the expected ratio is again 1.0.

CPU: one random Llama is saved unquantized and packed into each FP8 format
(`splitserve.testing.fp8_pack`: fbgemm_fp8 per channel, fp8 block-wise 128x128,
compressed-tensors per channel), into AWQ and compressed-tensors W4A16 (`splitserve.testing.
int4_pack`, group 128; 32 with --small), plus `--quantization fp8` on the unquantized folder; one
in-process engine (`splitserve.LLM`) per variant, all in one process, run alternately
(`--rounds`, the order reversed every other round), the median ratio printed last. Each run: `batch` random 64-token prompts, 32 output tokens (greedy,
`ignore_eos`); printed: output tokens/s of each and its ratio to the unquantized engine of
the same round. The CPU worker dequantizes FP8 and int4 to the compute dtype at load, so the expected
ratio is 1.0: this checks that nothing else (a per-step dequantization, lost oneDNN packing)
slipped in.

CUDA (when available): `kernels.fp8_gemm.fp8_w8a16_linear` against `torch.matmul` in fp16 on
the same shapes, M = 1, 4, 16 (decode) and 256, N = K = 4096 and N = 14336, K = 4096
(Llama-3-8B's MLP), per-channel and 128x128 block scales; prints microseconds and the speedup
(target >= 1.6x at decode shapes: the GEMM reads half the weight bytes); then
`kernels.w4a16_gemm.w4a16_linear` (group 128, asymmetric) against the same fp16 GEMM at
M = 1, 2, 4, 8, 16 and 256 (target >= 2.5x at M <= 16: a quarter of the weight bytes), with the
weight bytes each reads per microsecond; then, on GPUs with FP8 tensor cores (>= 8.9),
`kernels.fp8_scaled_mm.fp8_w8a8_linear` (activations quantized per token, included in the
time) against fp16 at prefill shapes M = 256, 1024, 4096 (target >= 1.5x). Without CUDA it
says so and exits 0 after the CPU part.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import tempfile
import time

VARIANTS = ("unquantized", "fbgemm_fp8", "fp8-block", "ct-channel", "online-fp8", "awq", "w4a16")


def build_mxfp4(root: pathlib.Path, small: bool) -> dict[str, tuple[pathlib.Path, dict]]:
    from splitserve.testing.demo_model import build_model
    from splitserve.testing.mxfp4_pack import pack_checkpoint

    size = (
        {"hidden_size": 64, "intermediate_size": 64, "num_layers": 2, "head_dim": 16}
        if small
        else {"hidden_size": 768, "intermediate_size": 768, "num_layers": 6, "head_dim": 64}
    )
    src = build_model(
        root / "gpt-oss", "gpt_oss", vocab_size=2000, max_position_embeddings=512,
        num_heads=12 if not small else 4, num_kv_heads=4 if not small else 2,
        num_local_experts=8, num_experts_per_tok=2, sliding_window=32, **size,
    )  # fmt: skip
    return {"unquantized": (src, {}), "mxfp4": (pack_checkpoint(src, root / "mxfp4")[0], {})}


def build(root: pathlib.Path, small: bool) -> dict[str, tuple[pathlib.Path, dict]]:
    from splitserve.testing import int4_pack
    from splitserve.testing.demo_model import build_model
    from splitserve.testing.fp8_pack import pack_checkpoint

    size = (
        {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2}
        if small
        else {"hidden_size": 768, "intermediate_size": 2048, "num_layers": 6}
    )
    src = build_model(root / "base", "llama", vocab_size=2000, max_position_embeddings=512, **size)
    block = (32, 32) if small else (128, 128)
    out = {"unquantized": (src, {}), "online-fp8": (src, {"quantization": "fp8"})}
    for fmt in ("fbgemm_fp8", "fp8-block", "ct-channel"):
        out[fmt] = (pack_checkpoint(src, root / fmt, fmt, block)[0], {})
    for fmt in ("awq", "w4a16"):
        out[fmt] = (int4_pack.pack_checkpoint(src, root / fmt, fmt, 32 if small else 128)[0], {})
    assert set(out) == set(VARIANTS)
    return out


def tokens_per_s(llm, prompts, output_len: int) -> float:
    from splitserve import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outs) == len(prompts) * output_len
    return len(prompts) * output_len / elapsed


def cpu(args) -> None:
    from splitserve import LLM

    with tempfile.TemporaryDirectory() as tmp:
        models = (build_mxfp4 if args.mxfp4 else build)(pathlib.Path(tmp), args.small)
        engines = {
            name: LLM(str(path), kv_cache_memory=256 << 20, max_model_len=512, **kw)
            for name, (path, kw) in models.items()
        }
        rng = random.Random(0)
        for batch in args.batches:
            prompts = [[rng.randrange(10, 2000) for _ in range(64)] for _ in range(batch)]
            for llm in engines.values():
                tokens_per_s(llm, prompts[:1], 4)  # warm-up
            ratios: dict[str, list[float]] = {name: [] for name in engines}
            for r in range(args.rounds):
                order = list(engines) if r % 2 == 0 else list(engines)[::-1]
                speed = {n: tokens_per_s(engines[n], prompts, args.output_len) for n in order}
                base = speed["unquantized"]
                line = ", ".join(
                    f"{n} {speed[n]:.1f} tok/s ({speed[n] / base:.2f}x)" for n in engines
                )
                print(f"CPU batch {batch} round {r + 1}: {line}", flush=True)
                for n in engines:
                    ratios[n].append(speed[n] / base)
            medians = ", ".join(
                f"{n} {statistics.median(v):.2f}x" for n, v in ratios.items() if n != "unquantized"
            )
            print(f"CPU batch {batch} median ratio to unquantized: {medians}", flush=True)


def gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: GPU part skipped")
        return
    from triton.testing import do_bench

    from splitserve.kernels.fp8_gemm import fp8_w8a16_linear

    print(f"GPU: {torch.cuda.get_device_name()}")
    for n, k in ((4096, 4096), (14336, 4096)):
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        w8 = (w16.float() / (w16.abs().amax() / 448)).to(torch.float8_e4m3fn)
        scales = {
            "channel": (torch.rand(n, 1, device="cuda") * 1e-4, (1, k)),
            "block128": (torch.rand(n // 128, k // 128, device="cuda") * 1e-4, (128, 128)),
        }
        for m in (1, 4, 16, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t16 = do_bench(lambda x=x, w=w16: torch.matmul(x, w.t())) * 1e3
            for name, (scale, block) in scales.items():
                t8 = (
                    do_bench(lambda x=x, w=w8, s=scale, b=block: fp8_w8a16_linear(x, w, s, b)) * 1e3
                )
                print(
                    f"W8A16 {name:8s} M={m:4d} N={n} K={k}: {t8:8.1f} us vs fp16 "
                    f"{t16:8.1f} us -> {t16 / t8:.2f}x",
                    flush=True,
                )
    gpu_w4a16()
    gpu_w8a8()


def gpu_w4a16() -> None:
    """W4A16 (group 128) against the fp16 GEMM, decode shapes and one prefill shape."""
    import torch
    from triton.testing import do_bench

    from splitserve.kernels.reference import int4_pack_k
    from splitserve.kernels.w4a16_gemm import w4a16_linear

    group = 128
    for n, k in ((4096, 4096), (14336, 4096)):
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        qweight = int4_pack_k(torch.randint(0, 16, (n, k), device="cuda"))
        scales = torch.rand(k // group, n, device="cuda", dtype=torch.float16) * 1e-2
        zeros = torch.randint(0, 16, (k // group, n), device="cuda").to(torch.float16)
        weight_bytes = qweight.numel() * 4 + scales.numel() * 2 * 2
        for m in (1, 2, 4, 8, 16, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t16 = do_bench(lambda x=x, w=w16: torch.matmul(x, w.t())) * 1e3
            args = (qweight, scales, zeros, group)
            t4 = do_bench(lambda x=x, a=args: w4a16_linear(x, *a)) * 1e3
            print(
                f"W4A16 g{group} M={m:4d} N={n} K={k}: {t4:8.1f} us ({weight_bytes / t4 / 1e3:6.0f} "
                f"GB/s of int4 weight) vs fp16 {t16:8.1f} us -> {t16 / t4:.2f}x",
                flush=True,
            )


def gpu_w8a8() -> None:
    """W8A8 FP8 (activations quantized per token) against fp16 at prefill shapes."""
    import torch
    from triton.testing import do_bench

    from splitserve.kernels import dispatch
    from splitserve.kernels.fp8_scaled_mm import fp8_w8a8_linear

    if torch.cuda.get_device_capability() < dispatch.W8A8_MIN_CAPABILITY:
        print("W8A8: no FP8 tensor cores on this GPU (capability < 8.9): skipped")
        return
    for n, k in ((4096, 4096), (14336, 4096)):
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        w8 = (w16.float() / (w16.abs().amax() / 448)).to(torch.float8_e4m3fn)
        scales = {
            "channel": (torch.rand(n, 1, device="cuda") * 1e-4, (1, k)),
            "block128": (torch.rand(n // 128, k // 128, device="cuda") * 1e-4, (128, 128)),
        }
        for m in (256, 1024, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t16 = do_bench(lambda x=x, w=w16: torch.matmul(x, w.t())) * 1e3
            for name, (scale, block) in scales.items():
                args = (w8, scale, block)
                t8 = do_bench(lambda x=x, a=args: fp8_w8a8_linear(x, *a)) * 1e3
                print(
                    f"W8A8 {name:8s} M={m:5d} N={n} K={k}: {t8:8.1f} us (activation "
                    f"quantization included) vs fp16 {t16:8.1f} us -> {t16 / t8:.2f}x",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model, one round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", default="1,8", help="concurrencies, comma-separated")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument(
        "--mxfp4", action="store_true", help="CPU: gpt-oss MXFP4 vs unquantized (not the Llama set)"
    )
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.small:
        args.rounds, args.output_len = 1, 16
    if not args.skip_cpu:
        cpu(args)
    gpu()


if __name__ == "__main__":
    main()
