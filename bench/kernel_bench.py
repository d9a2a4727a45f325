"""Kernel and end-to-end decode benchmarks, reported as ratios measured in the same run.

On a CUDA device: each Triton kernel's achieved bytes/s against a device-to-device copy
(memory-bound kernels: decode attention, KV write, RMSNorm, rotary, SiLU-and-mul, bitmask),
and prefill attention's FLOP/s against a dense fp16 matmul. The headline case is decode
attention at batch 64, context 2048 (Llama-3-8B heads: 32 query / 8 KV, head dim 128, fp16);
target: >= 60% of the copy bandwidth.

End to end (CUDA): decode tokens/s of a ~1B Llama-shaped bf16 model with random weights
(`load_format="dummy"`: hidden 2048, 16 layers, 32 query / 8 KV heads, intermediate 8192,
vocab 32000) through `splitserve.LLM`, with CUDA graphs and with `enforce_eager`, at batch 1,
8 and 64, and `transformers.generate` at batch 64 on the same GPU. Decode rate = batch *
(N - 1) new tokens / (time for N tokens - time for 1 token), so prefill cancels out. Targets:
graphs >= 1.3x eager at batch 1-8; the engine >= 5x transformers at 64.

Without CUDA it says so, times the CPU torch paths against the plain references on small
shapes (and CPU decode attention against a CPU memcpy), runs the end-to-end harness once on a
tiny model as a smoke test (its speeds mean nothing), times a CPU decode step of the demo-size
model (and of a ~200M one with --cpu-steps), and exits 0.

    python bench/kernel_bench.py            # full run
    python bench/kernel_bench.py --quick    # fewer repetitions
    python bench/kernel_bench.py --no-e2e   # kernels only
    python bench/kernel_bench.py --cpu-steps --threads 1   # CPU decode steps, demo and ~200M
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import tempfile
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
    from splitserve.kernels import torch_ops
    from splitserve.kernels.torch_attention import write_kv_cache_torch

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

    # Elementwise ops at a decode step's shapes (64 tokens, hidden 1024, 16 heads of 64).
    x, res, w = torch.randn(64, 1024), torch.randn(64, 1024), torch.randn(1024)
    gate_up = torch.randn(64, 2 * 2816)
    qkv = torch.randn(64, 48 * 64)
    positions = torch.randint(0, 2048, (64,))
    table = torch.randn(2048, 64)
    slots = torch.randperm(64 * 16)[:64]
    kc, vc = torch.zeros(64, 16, 16, 64), torch.zeros(64, 16, 16, 64)
    k, v = qkv[:, 1024:2048].view(64, 16, 64), qkv[:, 2048:].view(64, 16, 64)
    cases = {
        "fused_add_rms_norm": (  # the torch path consumes x: its time includes a copy
            lambda: ref.fused_add_rms_norm_ref(x, res, w, 1e-5),
            lambda: torch_ops.fused_add_rms_norm(x.clone(), res, w, 1e-5),
        ),
        "silu_and_mul": (
            lambda: ref.silu_and_mul_ref(gate_up),
            lambda: torch_ops.silu_and_mul(gate_up),
        ),
        "rotary (q, k views of qkv)": (
            lambda: ref.apply_rotary_ref(positions, qkv[:, :1024].view(64, 16, 64), k, table),
            lambda: torch_ops.apply_rotary(positions, qkv[:, :1024].view(64, 16, 64), k, table),
        ),
        "write_kv_cache": (
            lambda: ref.write_kv_cache_ref(k, v, kc, vc, slots),
            lambda: write_kv_cache_torch(k, v, kc, vc, slots),
        ),
    }
    for name, (fn_ref, fn_path) in cases.items():
        t_ref, t_path = cpu_times(fn_ref, fn_path, reps * 10)
        print(f"{name:27s}: ref {t_ref * 1e6:8.1f} us  torch path {t_path * 1e6:8.1f} us  "
              f"speed-up {t_ref / t_path:5.2f}x")  # fmt: skip
    print("(GELU-and-mul and the bitmask use their vectorised references as the CPU path)")


# --------------------------------------------------------------------------- CPU decode step

STEP_SHAPES = {
    # splitserve.testing.demo_model.DEMO_SIZES
    "demo": dict(
        vocab_size=2000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    # ~200M parameters
    "200m": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=16,
    ),
}


def cpu_step_time(shape: str, steps: int, batch: int = 64, block_size: int = 16) -> float:
    """Median wall seconds of `ModelRunner.execute` for a decode step of `batch` sequences
    (contexts 64-511, seeded) of a dummy-weight Llama of `shape`, on CPU.

    Uses only the runner's public API, so the same function times older trees too. The
    requests enter with their prompt already "cached" (num_computed_tokens = len - 1): every
    timed step is a pure decode step, sampling included.
    """
    import numpy as np
    import transformers

    from splitserve.common import messages as msg
    from splitserve.worker.config import WorkerConfig
    from splitserve.worker.model_runner import ModelRunner

    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.LlamaConfig(max_position_embeddings=2048, **STEP_SHAPES[shape])
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(tmp)
        runner = ModelRunner(
            WorkerConfig(
                model=tmp, load_format="dummy", device="cpu", max_model_len=1024,
                max_num_seqs=batch,
            )
        )  # fmt: skip
    rng = np.random.default_rng(0)
    lens = [int(n) for n in rng.integers(64, 512, size=batch)]
    need = [-(-(n + steps + 2) // block_size) for n in lens]
    runner.initialize_cache(sum(need) + 1, block_size)
    new, first = [], 0
    for i, n in enumerate(lens):
        new.append(
            msg.NewRequest(
                request_id=f"r{i}", token_ids=rng.integers(0, 1000, n).tolist(),
                block_ids=list(range(first, first + need[i])), num_computed_tokens=n - 1,
                num_prompt_tokens=n, sampling_params=msg.SamplingParams(temperature=0),
            )
        )  # fmt: skip
        first += need[i]
    times = []
    for s in range(steps + 2):
        step = msg.StepRequest(
            step_id=s,
            new_requests=new if s == 0 else [],
            cached_requests=[
                msg.CachedRequest(request_id=f"r{i}", num_computed_tokens=n - 1 + s)
                for i, n in enumerate(lens)
            ]
            if s
            else [],
            num_scheduled_tokens={f"r{i}": 1 for i in range(batch)},
        )
        start = time.perf_counter()
        result = runner.execute(step)
        times.append(time.perf_counter() - start)
        assert len(result.token_ids) == batch, result.errors
    return statistics.median(times[2:])


def bench_cpu_steps(shapes: list[str], steps: int) -> None:
    print(f"== CPU decode step (ModelRunner.execute, 64 sequences, {torch.get_num_threads()} "
          "threads): median wall time")  # fmt: skip
    for shape in shapes:
        print(f"  {shape:5s}: {cpu_step_time(shape, steps) * 1e3:9.1f} ms")


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
    print("  (target: decode attention b=64 ctx=2048 at >= 0.60 of the copy bandwidth)")

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


# --------------------------------------------------------------------------- end to end

E2E_SHAPES = {
    # ~1.0B parameters: Llama-3.2-1B-like proportions with a Llama-2 vocabulary.
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    # The CPU smoke run: the same harness, in seconds.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
}


@dataclass
class E2ESetup:
    """One end-to-end configuration: model shape, device, dtype and request sizes."""

    shape: str
    device: str
    dtype: str
    batches: tuple[int, ...]
    hf_batch: int
    prompt_len: int
    new_tokens: int
    reps: int


def make_dummy_model(out: pathlib.Path, shape: str, dtype: str) -> pathlib.Path:
    """A model folder without weights (`load_format="dummy"` draws them): config.json and a
    small tokenizer (prompts are token ids and nothing is detokenized)."""
    import transformers

    from splitserve.testing.demo_model import build_tokenizer

    build_tokenizer(out, vocab_size=300)
    config = transformers.LlamaConfig(
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        dtype=dtype,
        **E2E_SHAPES[shape],
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def engine_decode_rates(path: pathlib.Path, setup: E2ESetup, **flags) -> dict[int, float]:
    """Decode tokens/s of `splitserve.LLM` at each batch size of `setup`."""
    from splitserve import LLM, SamplingParams

    most = max(setup.batches)
    llm = LLM(
        str(path),
        load_format="dummy",
        device=setup.device,
        dtype=setup.dtype,
        max_model_len=setup.prompt_len + setup.new_tokens + 16,
        max_num_seqs=most,
        max_num_batched_tokens=most * setup.prompt_len,
        gpu_memory_utilization=0.6,  # plenty of KV blocks, quicker to allocate than 0.9
        **flags,
    )
    vocab = E2E_SHAPES[setup.shape]["vocab_size"]
    seed = iter(range(1, 1 << 30))  # fresh prompts every run: no prefix-cache hits

    def run(batch: int, max_tokens: int) -> float:
        params = SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, detokenize=False, temperature=0
        )
        prompts = _prompts(batch, setup.prompt_len, vocab, next(seed))
        _sync(setup.device)
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        _sync(setup.device)
        seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return seconds

    try:
        run(most, 4)  # warm-up: allocator, kernels' first launches
        rates = {}
        for batch in setup.batches:
            prefill = statistics.median(run(batch, 1) for _ in range(setup.reps))
            full = statistics.median(run(batch, setup.new_tokens) for _ in range(setup.reps))
            rates[batch] = batch * (setup.new_tokens - 1) / max(full - prefill, 1e-9)
        return rates
    finally:
        llm.shutdown()


def transformers_decode_rate(path: pathlib.Path, setup: E2ESetup) -> float:
    """Decode tokens/s of `transformers.generate` (greedy, static batch) at setup.hf_batch."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    dtype = getattr(torch, setup.dtype)
    with torch.device(setup.device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.tensor(
        _prompts(setup.hf_batch, setup.prompt_len, config.vocab_size, 0), device=setup.device
    )

    def run(n: int) -> float:
        _sync(setup.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        _sync(setup.device)
        assert out.shape[1] == setup.prompt_len + n
        return time.perf_counter() - start

    run(4)
    prefill = statistics.median(run(1) for _ in range(setup.reps))
    full = statistics.median(run(setup.new_tokens) for _ in range(setup.reps))
    return setup.hf_batch * (setup.new_tokens - 1) / max(full - prefill, 1e-9)


def bench_e2e(setup: E2ESetup) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = make_dummy_model(pathlib.Path(tmp), setup.shape, setup.dtype)
        # One engine (or model) at a time on the device: each is freed before the next loads.
        graphs = engine_decode_rates(path, setup, enforce_eager=False)
        _release(setup.device)
        eager = engine_decode_rates(path, setup, enforce_eager=True)
        _release(setup.device)
        hf = transformers_decode_rate(path, setup)
        _release(setup.device)
    print(f"decode tokens/s ({setup.shape}, {setup.dtype}, prompt {setup.prompt_len}, "
          f"{setup.new_tokens} new tokens per request):")  # fmt: skip
    if setup.device != "cuda":
        # Without CUDA both engines run eagerly and the model is tiny: no ratio means anything.
        for batch in setup.batches:
            print(f"  batch {batch:3d}: default {graphs[batch]:10.1f}  enforce_eager "
                  f"{eager[batch]:10.1f}")  # fmt: skip
        print(f"  transformers.generate batch {setup.hf_batch}: {hf:10.1f}")
        return
    for batch in setup.batches:
        print(f"  batch {batch:3d}: CUDA graphs {graphs[batch]:10.1f}  enforce_eager "
              f"{eager[batch]:10.1f}  graphs/eager {graphs[batch] / eager[batch]:5.2f}x")  # fmt: skip
    print(f"  transformers.generate batch {setup.hf_batch}: {hf:10.1f}  "
          f"engine/transformers {graphs[setup.hf_batch] / hf:5.2f}x")  # fmt: skip
    print("  (targets: graphs/eager >= 1.3x at batch 1-8; engine/transformers >= 5x at 64)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode runs")
    parser.add_argument(
        "--cpu-steps",
        action="store_true",
        help="also time CPU decode steps of the demo-size and a ~200M model (about a minute)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 5 if args.quick else 20
    if torch.cuda.is_available():
        bench_gpu(reps)
        if not args.no_e2e:
            print("== GPU end to end: splitserve.LLM vs transformers.generate")
            bench_e2e(E2ESetup("llama-1b", "cuda", "bfloat16", (1, 8, 64), 64, 128, 128, 3))
    else:
        print("No CUDA GPU found: GPU kernel and end-to-end figures skipped; CPU parts only.")
    bench_cpu(max(3, reps // 4))
    bench_cpu_steps(["demo", "200m"] if args.cpu_steps else ["demo"], 5 if args.quick else 10)
    if not torch.cuda.is_available() and not args.no_e2e:
        print("== CPU smoke run of the end-to-end harness (tiny model: speeds mean nothing)")
        bench_e2e(E2ESetup("tiny", "cpu", "float32", (1, 8), 8, 16, 8, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
