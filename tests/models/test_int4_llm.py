"""Int4 checkpoints through `LLM` (scheduler + worker in one process): greedy tokens equal to
transformers on the dequantized weights, and LoRA adapters on an AWQ base equal to peft on the
dequantized base (LoRA wraps the quantized layer)."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams
from splitserve.common.lora import LoRARequest
from splitserve.testing.int4_pack import pack_checkpoint

from .lora_utils import make_adapter, peft_greedy

MAX_TOKENS = 10
PROMPTS = [[11, 57, 300, 42, 9, 610, 77], [5, 900, 13, 250, 88], [400, 401, 402]]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def awq(model_factory, tmp_path_factory):
    """(AWQ folder, dequantized folder, adapter root) of the qwen2 test model (q/k/v biases)."""
    root = tmp_path_factory.mktemp("int4_llm")
    folder, dense = pack_checkpoint(model_factory("qwen2"), root / "awq", "awq", group=64)
    loras = root / "loras"
    make_adapter(dense, loras / "attn", ["q_proj", "v_proj", "o_proj"], 4, 8, 1)
    make_adapter(dense, loras / "mlp", ["gate_proj", "up_proj", "down_proj"], 4, 8, 2)
    return folder, dense, loras


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_w4a16_llm_matches_transformers(model_factory, tmp_path):
    folder, dense = pack_checkpoint(model_factory("llama"), tmp_path / "ct", "w4a16", group=64)
    llm = LLM(str(folder))
    try:
        assert _tokens(llm.generate(PROMPTS, GREEDY)) == peft_greedy(
            dense, None, PROMPTS, MAX_TOKENS
        )
    finally:
        llm.shutdown()


def test_lora_on_an_awq_base_matches_peft(awq):
    folder, dense, loras = awq
    expected = {
        name: peft_greedy(dense, loras / name, PROMPTS, MAX_TOKENS) for name in ("attn", "mlp")
    }
    expected[""] = peft_greedy(dense, None, PROMPTS, MAX_TOKENS)
    assert expected["attn"] != expected[""] and expected["mlp"] != expected[""]  # adapters matter
    llm = LLM(str(folder), enable_lora=True, lora_root=str(loras), max_loras=2, max_lora_rank=4)
    try:
        attn, mlp = (LoRARequest(n, i, str(loras / n)) for i, n in enumerate(("attn", "mlp"), 1))
        prompts = PROMPTS * 3
        requests = [attn] * len(PROMPTS) + [mlp] * len(PROMPTS) + [None] * len(PROMPTS)
        outs = _tokens(llm.generate(prompts, GREEDY, lora_request=requests))
        assert outs == expected["attn"] + expected["mlp"] + expected[""]
    finally:
        llm.shutdown()
