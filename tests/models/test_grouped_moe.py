"""The Mixtral batch with its MoE layers on the grouped GEMM (what `dispatch.fused_moe` runs on
CUDA; interpreted on CPU): prefill chunks take the contiguous layout, decode steps the masked
one, and the tokens and logprobs follow transformers."""

from __future__ import annotations

import os

import pytest
import torch

from splitserve.common import messages as msg
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_runner import ModelRunner

from .utils import StepDriver, check_logprobs_close, hf_greedy_logprobs, hf_model


def test_grouped_gemm_moe_matches_transformers(model_factory, monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    from splitserve.kernels import dispatch, grouped_moe

    path = model_factory("mixtral")
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in (70, 6)]
    tokens = 4
    theirs = hf_greedy_logprobs(hf_model(path), prompts, tokens, 5)

    runner = ModelRunner(WorkerConfig(model=str(path)))
    driver = StepDriver(runner, block_size=16)
    layouts = []
    real_fused, real_choose = dispatch.fused_moe, grouped_moe.choose_layout

    def choose(*args):
        layouts.append(real_choose(*args))
        return layouts[-1]

    monkeypatch.setattr(grouped_moe, "choose_layout", choose)
    monkeypatch.setattr(dispatch, "fused_moe", lambda *a: real_fused(*a, backend="triton"))
    for i, prompt in enumerate(prompts):
        driver.add(str(i), prompt, tokens, msg.SamplingParams(temperature=0, logprobs=5))
    out = driver.run()
    # The 76-token prefill step is contiguous; the 2-token decode steps are masked.
    assert layouts[0] == "contiguous" and layouts[-1] == "masked"
    assert len(layouts) == 2 * tokens  # both layers, every step
    ours = [out[str(i)].top_logprobs() for i in range(len(prompts))]
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers", "splitserve grouped GEMM")
