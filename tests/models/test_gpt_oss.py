"""gpt-oss against transformers on tiny random weights (float32, CPU): sinks, alternating
sliding-window and full layers, YaRN, biased experts with the clamped SwiGLU."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.common import messages as msg
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_runner import ModelRunner

from .utils import StepDriver, check_logprobs_close, hf_greedy_logprobs, hf_model

MAX_TOKENS = 24
NUM_LOGPROBS = 5
WINDOW = 8


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in lengths]


# Most prompts are longer than the 8-token window, so the sliding layers drop keys.
PROMPTS = _prompts([5, 21, 37, 12])


@pytest.fixture(scope="module")
def gpt_oss_path(model_factory):
    return model_factory("gpt_oss")


@pytest.fixture(scope="module")
def reference(gpt_oss_path):
    return hf_greedy_logprobs(hf_model(gpt_oss_path), PROMPTS, MAX_TOKENS, NUM_LOGPROBS)


def _greedy() -> msg.SamplingParams:
    params = msg.SamplingParams(temperature=0)
    params.logprobs = NUM_LOGPROBS
    return params


def test_layers_follow_the_config(gpt_oss_path):
    runner = ModelRunner(WorkerConfig(model=str(gpt_oss_path)))
    layers = runner.model.model.layers
    assert [layer.self_attn.attn.sliding_window for layer in layers] == [WINDOW, None, WINDOW]
    assert layers[0].mlp.experts.swiglu_limit == 1.5
    # the learned sinks are loaded (transformers initialises them randomly, not to zero)
    assert layers[0].self_attn.sinks.abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_greedy_and_logprobs_match_transformers(gpt_oss_path, reference, chunk_size):
    runner = ModelRunner(WorkerConfig(model=str(gpt_oss_path)))
    driver = StepDriver(runner, block_size=4, chunk_size=chunk_size)
    for i, prompt in enumerate(PROMPTS):
        driver.add(str(i), prompt, MAX_TOKENS, _greedy())
    out = driver.run()
    assert all(r.error is None for r in out.values()), {k: r.error for k, r in out.items()}
    ours = [out[str(i)].top_logprobs() for i in range(len(PROMPTS))]
    assert [t for t, _ in ours] == [t for t, _ in reference]
    check_logprobs_close(reference, ours, "transformers", "splitserve")


def test_sinks_and_window_change_the_output(gpt_oss_path, reference):
    """Dropping the sinks or the window gives other logprobs: the parity above depends on them."""
    runner = ModelRunner(WorkerConfig(model=str(gpt_oss_path)))
    for layer in runner.model.model.layers:
        layer.self_attn.sinks.data.fill_(-1e4)
        layer.self_attn.attn.sliding_window = None
    driver = StepDriver(runner, block_size=4)
    driver.add("0", PROMPTS[2], MAX_TOKENS, _greedy())
    _, lps = driver.run()["0"].top_logprobs()
    assert lps[0] != pytest.approx(reference[2][1][0], abs=1e-3)


def test_in_process_llm_matches_transformers(gpt_oss_path, reference):
    llm = LLM(str(gpt_oss_path))
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate(PROMPTS, params)
        assert [list(o.outputs[0].token_ids) for o in outs] == [t for t, _ in reference]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def mxfp4_folders(gpt_oss_path, tmp_path_factory):
    from splitserve.testing.mxfp4_pack import pack_checkpoint

    return pack_checkpoint(gpt_oss_path, tmp_path_factory.mktemp("mxfp4") / "gpt-oss-mxfp4")


@pytest.fixture(scope="module")
def mxfp4_reference(mxfp4_folders):
    """transformers' own MXFP4 dequantization of the packed folder (CPU, float32)."""
    import transformers

    model = hf_model(
        mxfp4_folders[0], quantization_config=transformers.Mxfp4Config(dequantize=True)
    )
    return hf_greedy_logprobs(model, PROMPTS, MAX_TOKENS, NUM_LOGPROBS)


def test_mxfp4_experts_load_as_transformers_dequantizes_them(mxfp4_folders):
    """The worker's dequantized stacks equal transformers' (gate rows first, then up)."""
    import transformers

    runner = ModelRunner(WorkerConfig(model=str(mxfp4_folders[0])))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        mxfp4_folders[0],
        dtype=torch.float32,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
    ).state_dict()
    for i, layer in enumerate(runner.model.model.layers):
        experts = layer.mlp.experts
        assert not hasattr(experts, "gate_up_proj_blocks")  # freed after dequantizing (CPU)
        gate_up = theirs[f"model.layers.{i}.mlp.experts.gate_up_proj"].transpose(1, 2)
        assert torch.equal(experts.gate_up_proj, torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], 1))
        down = theirs[f"model.layers.{i}.mlp.experts.down_proj"].transpose(1, 2)
        assert torch.equal(experts.down_proj, down)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_mxfp4_matches_transformers_dequantized(mxfp4_folders, mxfp4_reference, chunk_size):
    runner = ModelRunner(WorkerConfig(model=str(mxfp4_folders[0]), quantization="mxfp4"))
    driver = StepDriver(runner, block_size=4, chunk_size=chunk_size)
    for i, prompt in enumerate(PROMPTS):
        driver.add(str(i), prompt, MAX_TOKENS, _greedy())
    out = driver.run()
    ours = [out[str(i)].top_logprobs() for i in range(len(PROMPTS))]
    assert [t for t, _ in ours] == [t for t, _ in mxfp4_reference]
    check_logprobs_close(mxfp4_reference, ours, "transformers-mxfp4", "splitserve")


def test_mxfp4_in_process_llm_matches_transformers(mxfp4_folders, mxfp4_reference, reference):
    llm = LLM(str(mxfp4_folders[0]))
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
        assert outs == [t for t, _ in mxfp4_reference]
    finally:
        llm.shutdown()
    # the 4-bit experts are not the original ones: the comparison above is not vacuous
    assert [lp for _, lp in mxfp4_reference] != [lp for _, lp in reference]


def test_quantization_flag_must_match_the_checkpoint(gpt_oss_path, mxfp4_folders):
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        ModelRunner(WorkerConfig(model=str(mxfp4_folders[0]), quantization="awq"))
    with pytest.raises(ValueError, match="--quantization mxfp4 needs a checkpoint"):
        ModelRunner(WorkerConfig(model=str(gpt_oss_path), quantization="mxfp4"))


def test_packed_mxfp4_experts_run_through_the_triton_kernel(
    mxfp4_folders, mxfp4_reference, monkeypatch
):
    """As on CUDA: the experts stay packed and every MoE layer runs the MXFP4 kernel (here in
    the Triton interpreter); tokens and logprobs still match transformers' dequantized model."""
    import os

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    from splitserve.kernels import dispatch
    from splitserve.kernels.mxfp4_moe import fused_moe_mxfp4

    calls = []

    def triton_mxfp4(*args, **kwargs):
        calls.append(args[0].shape[0])
        return fused_moe_mxfp4(*args, **kwargs)

    monkeypatch.setattr(dispatch, "mxfp4_moe_available", lambda device: True)
    monkeypatch.setattr(dispatch, "fused_moe_mxfp4", triton_mxfp4)
    runner = ModelRunner(WorkerConfig(model=str(mxfp4_folders[0])))
    experts = runner.model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and not hasattr(experts, "gate_up_proj")
    tokens = 6  # the interpreter is slow
    driver = StepDriver(runner, block_size=4, chunk_size=5)
    for i in (1, 2):
        driver.add(str(i), PROMPTS[i], tokens, _greedy())
    out = driver.run()
    assert len(calls) >= 3 * tokens  # three MoE layers, every step
    ours = [out[str(i)].top_logprobs() for i in (1, 2)]
    theirs = [(t[:tokens], lp[:tokens]) for t, lp in (mxfp4_reference[i] for i in (1, 2))]
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers-mxfp4", "splitserve")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mxfp4_on_cuda_keeps_the_experts_packed(mxfp4_folders, mxfp4_reference):
    """On CUDA the experts stay MXFP4 (uint8 blocks on the device) and the Triton kernel runs
    them; greedy tokens still equal transformers' on the dequantized weights (float32)."""
    runner = ModelRunner(WorkerConfig(model=str(mxfp4_folders[0]), device="cuda"))
    experts = runner.model.model.layers[0].mlp.experts
    assert experts.packed and experts.gate_up_proj_blocks.is_cuda
    assert not hasattr(experts, "gate_up_proj")
    driver = StepDriver(runner, block_size=4)
    for i, prompt in enumerate(PROMPTS):
        driver.add(str(i), prompt, MAX_TOKENS, _greedy())
    out = driver.run()
    ours = [out[str(i)].top_logprobs() for i in range(len(PROMPTS))]
    assert [t for t, _ in ours] == [t for t, _ in mxfp4_reference]


def test_modules_to_not_convert_patterns():
    from splitserve.worker.quantization.mxfp4 import not_converted

    patterns = ["model.layers.*.self_attn", "model.layers.1.mlp.experts", "lm_head"]
    assert not_converted("model.layers.1.mlp.experts", patterns)
    assert not_converted("model.layers.12.self_attn", patterns)
    assert not not_converted("model.layers.11.mlp.experts", patterns)  # not a prefix at a dot
    assert not not_converted("model.layers.0.mlp.experts", patterns)
    assert not_converted("model.layers.0.mlp.experts", ["experts"])  # a suffix


def test_experts_left_unconverted_load_dense(gpt_oss_path, tmp_path):
    """Layer 1's experts saved unquantized and named in modules_to_not_convert: the worker
    keeps them as they are, quantizes the others, and matches transformers."""
    import transformers

    from splitserve.testing.mxfp4_pack import pack_checkpoint

    folder, _ = pack_checkpoint(gpt_oss_path, tmp_path / "mixed", dense_layers=(1,))
    runner = ModelRunner(WorkerConfig(model=str(folder)))
    layers = runner.model.model.layers
    assert layers[1].mlp.experts.method is None
    assert layers[0].mlp.experts.method is not None and layers[2].mlp.experts.method is not None
    model = hf_model(folder, quantization_config=transformers.Mxfp4Config(dequantize=True))
    theirs = hf_greedy_logprobs(model, PROMPTS[1:3], 8, NUM_LOGPROBS)
    driver = StepDriver(runner, block_size=4)
    for i, prompt in enumerate(PROMPTS[1:3]):
        driver.add(str(i), prompt, 8, _greedy())
    out = driver.run()
    ours = [out[str(i)].top_logprobs() for i in range(2)]
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers-mxfp4", "splitserve")


def test_hidden_size_twice_the_intermediate_loads_the_right_stacks(tmp_path):
    """H = 2I: down_proj [E, I, H] transposed has the shape of gate_up's rows; only gate_up
    (weights and bias) is de-interleaved."""
    from splitserve.testing.demo_model import build_model

    folder = build_model(
        tmp_path / "h2i", "gpt_oss", vocab_size=300, hidden_size=64, intermediate_size=32,
        num_layers=1, head_dim=16, num_local_experts=4, sliding_window=8,
        max_position_embeddings=128,
    )  # fmt: skip
    runner = ModelRunner(WorkerConfig(model=str(folder)))
    theirs = hf_model(folder).state_dict()
    experts = runner.model.model.layers[0].mlp.experts
    gate_up = theirs["model.layers.0.mlp.experts.gate_up_proj"].transpose(1, 2)
    assert torch.equal(experts.gate_up_proj, torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], 1))
    down = theirs["model.layers.0.mlp.experts.down_proj"].transpose(1, 2)
    assert torch.equal(experts.down_proj, down)
    assert torch.equal(experts.down_proj_bias, theirs["model.layers.0.mlp.experts.down_proj_bias"])
