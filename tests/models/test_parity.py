"""splitserve.worker against transformers on the same tiny random weights (float32, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from splitserve.common import messages as msg
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_runner import ModelRunner

from .utils import (
    StepDriver,
    check_logprobs_close,
    hf_greedy_logprobs,
    hf_model,
    hf_prompt_logprobs,
)

MAX_TOKENS = 32
NUM_LOGPROBS = 5


def _prompts(lengths: list[int], seed: int = 0, vocab: int = 1000) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in lengths]


PROMPTS = _prompts([7, 23, 3, 40, 16])


def _greedy(logprobs: int | None = NUM_LOGPROBS, **kwargs) -> msg.SamplingParams:
    params = msg.SamplingParams(temperature=0, **kwargs)
    if logprobs is not None:
        params.logprobs = logprobs
    return params


@pytest.fixture(scope="module")
def runner_for(model_factory):
    runners: dict[str, ModelRunner] = {}

    def get(name: str) -> ModelRunner:
        if name not in runners:
            runners[name] = ModelRunner(WorkerConfig(model=str(model_factory(name))))
        return runners[name]

    return get


@pytest.fixture(scope="module")
def reference(model_factory):
    cache: dict[str, list] = {}

    def get(name: str) -> list:
        if name not in cache:
            cache[name] = hf_greedy_logprobs(
                hf_model(model_factory(name)), PROMPTS, MAX_TOKENS, NUM_LOGPROBS
            )
        return cache[name]

    return get


def _run_continuous_batch(runner: ModelRunner, **driver_kwargs) -> list:
    """Three prompts start together; two more join while the others decode."""
    driver = StepDriver(runner, **driver_kwargs)
    for i in range(3):
        driver.add(str(i), PROMPTS[i], MAX_TOKENS, _greedy())
    for _ in range(5):
        driver.step()
    driver.add("3", PROMPTS[3], MAX_TOKENS, _greedy())
    driver.step()
    driver.add("4", PROMPTS[4], MAX_TOKENS, _greedy())
    out = driver.run()
    assert all(r.error is None for r in out.values()), {k: r.error for k, r in out.items()}
    return [out[str(i)].top_logprobs() for i in range(len(PROMPTS))]


NEW_ARCHS = ["qwen3", "mixtral", "qwen3_moe"]


@pytest.mark.parametrize(
    "name", ["llama", "qwen2", "mistral", "llama3_rope", "yarn_rope", *NEW_ARCHS]
)
def test_greedy_and_logprobs_match_transformers(name, runner_for, reference):
    ours = _run_continuous_batch(runner_for(name), block_size=16)
    theirs = reference(name)
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers", "splitserve")


@pytest.mark.parametrize("name", ["llama", "qwen2", *NEW_ARCHS])
def test_chunked_prefill_matches_transformers(name, runner_for, reference):
    ours = _run_continuous_batch(runner_for(name), block_size=4, chunk_size=5)
    theirs = reference(name)
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers", "splitserve")


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_moe_parity_models_route_to_many_experts(name, runner_for, monkeypatch):
    """The MoE parity checkpoints exercise real routing: decode steps of the batch reach most
    of the 8 experts, and every sparse layer of the model runs the MoE op."""
    from splitserve.kernels import dispatch

    counts: list[list[int]] = []
    real = dispatch.fused_moe

    def recording(x, w13, w2, topk_weights, topk_ids):
        counts.append(torch.bincount(topk_ids.flatten(), minlength=w13.shape[0]).tolist())
        return real(x, w13, w2, topk_weights, topk_ids)

    monkeypatch.setattr(dispatch, "fused_moe", recording)
    runner = runner_for(name)
    assert runner.model.supports_cuda_graphs is False
    driver = StepDriver(runner, block_size=16)
    counts.clear()  # the cache set-up ran warm-up steps
    for i in range(3):
        driver.add(str(i), PROMPTS[i], 4, _greedy())
    driver.run()
    sparse_layers = 2  # mixtral: both layers; qwen3_moe: 0 and 2 (1 is dense)
    assert len(counts) == 4 * sparse_layers  # one prefill step and three decode steps
    assert all(sum(c) == 2 * n for c, n in zip(counts[::sparse_layers], [33, 3, 3, 3]))
    used = [sum(1 for n in c if n) for c in counts]
    assert min(used[:sparse_layers]) >= 6, counts  # the 33-token prefill reaches most experts


def test_triton_moe_kernel_matches_transformers(runner_for, reference, monkeypatch):
    """The Mixtral batch with the MoE layers on the Triton kernel (interpreted on CPU)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    from splitserve.kernels import dispatch
    from splitserve.kernels.fused_moe import fused_moe

    calls = []

    def triton_moe(*args):
        calls.append(args[0].shape[0])
        return fused_moe(*args)

    driver = StepDriver(runner_for("mixtral"), block_size=4, chunk_size=5)
    monkeypatch.setattr(dispatch, "fused_moe", triton_moe)
    tokens = 5  # the interpreter is slow: two prompts (one chunked), a few tokens
    for i in (0, 2):
        driver.add(str(i), PROMPTS[i], tokens, _greedy())
    out = driver.run()
    assert len(calls) >= 2 * tokens  # both layers, every step, through the kernel
    ours = [out[str(i)].top_logprobs() for i in (0, 2)]
    theirs = [(t[:tokens], lp[:tokens]) for t, lp in (reference("mixtral")[i] for i in (0, 2))]
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers", "splitserve")


def test_triton_attention_backend_matches_transformers(model_factory, reference):
    """The same continuous batch (chunked) through splitserve.kernels' Triton attention
    (compiled on CUDA, interpreted on CPU)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    runner = ModelRunner(
        WorkerConfig(model=str(model_factory("llama")), attention_backend="triton")
    )
    assert runner.backend.name == "triton"
    ours = _run_continuous_batch(runner, block_size=4, chunk_size=5)
    theirs = reference("llama")
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers", "splitserve")


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_sliding_window_matches_transformers(chunk_size, mistral_sliding_path):
    runner = ModelRunner(WorkerConfig(model=str(mistral_sliding_path)))
    assert runner.model.model.layers[0].self_attn.attn.sliding_window == 12
    driver = StepDriver(runner, block_size=4, chunk_size=chunk_size)
    for i in (1, 3):
        driver.add(str(i), PROMPTS[i], MAX_TOKENS, _greedy())
    out = driver.run()
    ours = [out[str(i)].top_logprobs() for i in (1, 3)]
    theirs = hf_greedy_logprobs(
        hf_model(mistral_sliding_path), [PROMPTS[1], PROMPTS[3]], MAX_TOKENS, NUM_LOGPROBS
    )
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers", "splitserve")


@pytest.mark.parametrize("block_size", [4, 16])
def test_prefix_cache_hit_matches_transformers(block_size, runner_for, model_factory):
    base = PROMPTS[3]  # 40 tokens
    second = base[:33] + PROMPTS[1][:9]  # shares 33 tokens with the first
    runner = runner_for("llama")
    driver = StepDriver(runner, block_size=block_size)
    driver.add("a", base, MAX_TOKENS, _greedy())
    driver.step()  # a's prompt is in the cache now
    shared = 33 // block_size
    driver.add("b", second, MAX_TOKENS, _greedy(), shared_prefix_from="a", num_shared_blocks=shared)
    out = driver.run()
    theirs = hf_greedy_logprobs(
        hf_model(model_factory("llama")), [base, second], MAX_TOKENS, NUM_LOGPROBS
    )
    ours = [out["a"].top_logprobs(), out["b"].top_logprobs()]
    assert out["b"].block_ids[:shared] == out["a"].block_ids[:shared]
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers", "splitserve")


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_prompt_logprobs_match_transformers(chunk_size, runner_for, model_factory):
    prompt = PROMPTS[3]
    driver = StepDriver(runner_for("llama"), block_size=8, chunk_size=chunk_size)
    driver.add("p", prompt, 2, _greedy(logprobs=None, prompt_logprobs=3))
    driver.add("q", PROMPTS[0], 2, _greedy())  # a neighbour that does not ask
    out = driver.run()
    entries = out["p"].prompt_logprobs
    assert out["q"].prompt_logprobs == []
    assert [e.token_id for e in entries] == prompt[1:]
    expected = hf_prompt_logprobs(hf_model(model_factory("llama")), prompt)
    got = torch.tensor([e.logprob for e in entries])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    for e in entries:
        assert len(e.top_token_ids) == 3 and e.rank >= 1
        if e.rank == 1:
            assert e.top_token_ids[0] == e.token_id
        assert e.top_logprobs[0] >= e.logprob - 1e-6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_load_and_run(dtype, llama_path, runner_for):
    runner = ModelRunner(WorkerConfig(model=str(llama_path), dtype=dtype))
    assert runner.dtype == getattr(torch, dtype)
    assert next(runner.model.parameters()).dtype == runner.dtype
    driver = StepDriver(runner, block_size=16)
    assert runner.kv_cache.caches[0][0].dtype == runner.dtype
    for i in range(3):
        driver.add(str(i), PROMPTS[i], 8, _greedy())
    out = driver.run()
    fp32 = StepDriver(runner_for("llama"), block_size=16)
    fp32.add("0", PROMPTS[0], 8, _greedy())
    reference = fp32.run()["0"]
    for i in range(3):
        tokens, tops = out[str(i)].top_logprobs()
        assert len(tokens) == 8 and all(0 <= t < runner.vocab_size for t in tokens)
        assert all(all(v <= 0 and v == v for v in top.values()) for top in tops)
    # sane, not exact: the first greedy step sees the same top token as float32
    assert out["0"].outputs[0] in reference.top_logprobs()[1][0]
