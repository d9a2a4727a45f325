"""gpt-oss through the real stack: greedy tokens equal to transformers (float32), logprobs
within 1e-3, on a prompt longer than the sliding window, from its MXFP4 checkpoint.

On CPU the MXFP4 experts are dequantized once at load and then run the unquantized experts
path, so past loading this stack runs the code the unquantized checkpoint would; that
checkpoint's loading against transformers is tests/models/test_gpt_oss.py's (one rank and the
in-process LLM)."""

from __future__ import annotations

import pytest

from splitserve.testing.demo_model import build_model

from .conftest import Server

WINDOW = 8
PROMPT_IDS = [5, 17, 40, 99, 123, 7, 300, 12, 45, 600, 8, 19, 230, 77, 41, 901, 64, 3, 88, 150]
STEPS = 12


@pytest.fixture(scope="module")
def gpt_oss_model(tmp_path_factory):
    return build_model(
        tmp_path_factory.mktemp("e2e_gpt_oss") / "tiny-gpt-oss",
        "gpt_oss",
        hidden_size=64,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        swiglu_limit=1.5,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "truncate": False,
            "original_max_position_embeddings": 128,
        },
    )


def hf_greedy(folder, **kwargs) -> tuple[list[int], list[float]]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, **kwargs
    ).eval()
    ids, logprobs = list(PROMPT_IDS), []
    with torch.no_grad():
        for _ in range(STEPS):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            ids.append(int(lp.argmax()))
            logprobs.append(float(lp.max()))
    return ids[len(PROMPT_IDS) :], logprobs


def served_greedy(server) -> tuple[list[int], list[float]]:
    import httpx

    r = httpx.post(
        server.url + "/v1/completions",
        json={
            "model": server.model,
            "prompt": PROMPT_IDS,
            "max_tokens": STEPS,
            "temperature": 0,
            "logprobs": 1,
            "ignore_eos": True,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    return tokens, logprobs["token_logprobs"]


def assert_same(ours, theirs) -> None:
    assert ours[0] == theirs[0]
    for got, want in zip(ours[1], theirs[1], strict=True):
        assert abs(got - want) <= 1e-3


def test_mxfp4_gpt_oss_serves_transformers_dequantized_tokens(gpt_oss_model, tmp_path):
    import transformers

    assert len(PROMPT_IDS) > 2 * WINDOW

    from splitserve.testing.mxfp4_pack import pack_checkpoint

    folder, _ = pack_checkpoint(gpt_oss_model, tmp_path / "tiny-gpt-oss-mxfp4")
    flags = ["--quantization", "mxfp4", "--return-tokens-as-token-ids"]
    server = Server(folder, flags, tmp_path / "log")
    try:
        theirs = hf_greedy(folder, quantization_config=transformers.Mxfp4Config(dequantize=True))
        assert_same(served_greedy(server), theirs)
    finally:
        server.stop()
