"""EPLB at EP = 1 with redundant experts: the tiny Mixtral and Qwen3-MoE generate the same greedy
tokens (and logprobs within the rule) as transformers while their experts are rearranged
mid-stream, by the step-driven policy and by forced skewed placements."""

from __future__ import annotations

import pytest
import torch

from splitserve.common import messages as msg
from splitserve.worker.config import WorkerConfig
from splitserve.worker.eplb import EplbConfig, EplbState
from splitserve.worker.model_runner import ModelRunner

from .utils import StepDriver, check_logprobs_close, hf_greedy_logprobs, hf_model

MAX_TOKENS = 12
NUM_LOGPROBS = 5


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in (9, 21, 4)]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_tokens_survive_rearrangements(name, model_factory):
    path = model_factory(name)
    prompts = _prompts()
    theirs = hf_greedy_logprobs(hf_model(path), prompts, MAX_TOKENS, NUM_LOGPROBS)

    runner = ModelRunner(WorkerConfig(model=str(path)))
    config = EplbConfig(window_size=4, step_interval=3, num_redundant_experts=4)
    state = EplbState.attach(runner.model, config, num_ranks=4)
    num_layers, num_experts = len(state.layers), state.num_experts
    assert num_layers == 2 and state.num_physical == num_experts + 4
    assert state.layers[0].experts.gate_up_proj.shape[0] == num_experts + 4

    driver = StepDriver(runner, block_size=4)
    for i, prompt in enumerate(prompts):
        params = msg.SamplingParams(temperature=0, logprobs=NUM_LOGPROBS)
        driver.add(str(i), prompt, MAX_TOKENS, params)
    placements = [state.map.phy2log.clone()]
    scheduled = 0
    while not all(r.done for r in driver.requests.values()):
        driver.step()
        state.step()  # rebalances on the window every 3 steps
        scheduled += 1
        if scheduled % 4 == 2:  # and a forced placement: a different expert hot each time
            skew = torch.ones(num_layers, num_experts)
            skew[:, scheduled % num_experts] = 1000.0
            state.rebalance(skew)
        placements.append(state.map.phy2log.clone())
    distinct = {tuple(p.flatten().tolist()) for p in placements}
    assert len(distinct) >= 4, "the placement never changed"
    assert state.num_rebalances >= 6
    assert state.counter.window_load().sum() > 0

    ours = [driver.requests[str(i)].top_logprobs() for i in range(len(prompts))]
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    check_logprobs_close(theirs, ours, "transformers", "splitserve+eplb")
