"""Quantized checkpoints through the real stack: FP8 (block-wise `fp8`, the DeepSeek-V3 /
Qwen3-FP8 layout) with an FP8 KV cache, and AWQ int4: greedy tokens equal to transformers on the
dequantized weights, logprobs within 1e-3.

On CPU the worker dequantizes FP8 and int4 weights at load and then runs the unquantized paths,
so past loading the stack runs the same code for every format: one stack per weight family is
enough here. Each format's loading against transformers is the worker tests' business
(tests/worker/test_quantization.py, test_int4_quantization.py: compressed-tensors W4A16 with
`quantization="compressed-tensors"` too), and the FP8 checkpoint with an unquantized KV cache
runs the same code as the FP8 KV stack here but for the cache, which every other stack runs."""

from __future__ import annotations

import pytest

from splitserve.testing import int4_pack
from splitserve.testing.fp8_pack import pack_checkpoint

from .conftest import Server

PROMPT_IDS = [5, 17, 40, 99, 123, 7]
STEPS = 12


@pytest.fixture(scope="module")
def fp8_folders(tiny_model, tmp_path_factory):
    return pack_checkpoint(tiny_model, tmp_path_factory.mktemp("fp8") / "tiny-fp8", "fp8-block")


def _hf_greedy(folder, **kwargs) -> tuple[list[int], list[float]]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, **kwargs
    ).eval()
    ids, logprobs = list(PROMPT_IDS), []
    with torch.no_grad():
        for _ in range(STEPS):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
            ids.append(int(lp.argmax()))
            logprobs.append(float(lp.max()))
    return ids[len(PROMPT_IDS) :], logprobs


def _completion_matches(server, dense_folder, **hf_kwargs):
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
    expected_tokens, expected_logprobs = _hf_greedy(dense_folder, **hf_kwargs)
    assert tokens == expected_tokens
    for got, want in zip(logprobs["token_logprobs"], expected_logprobs, strict=True):
        assert abs(got - want) <= 1e-3


@pytest.mark.parametrize("fmt,flag", [("awq", "awq")])
def test_int4_checkpoint_serves_transformers_tokens(fmt, flag, tiny_model, tmp_path):
    folder, dense_folder = int4_pack.pack_checkpoint(tiny_model, tmp_path / fmt, fmt, group=64)
    server = Server(
        folder, ["--quantization", flag, "--return-tokens-as-token-ids"], tmp_path / "log"
    )
    try:
        _completion_matches(server, dense_folder)
    finally:
        server.stop()


def test_fp8_weights_with_an_fp8_kv_cache(fp8_folders, tmp_path):
    """--quantization fp8 and --kv-cache-dtype fp8 through the stack, on the FP8 checkpoint:
    transformers on the dequantized weights with K and V rounded as the cache stores them
    (scales 1.0)."""
    from splitserve.testing.fp8_kv import register_rounded_kv_attention

    flags = ["--quantization", "fp8", "--kv-cache-dtype", "fp8", "--return-tokens-as-token-ids"]
    server = Server(fp8_folders[0], flags, tmp_path / "log")
    try:
        _completion_matches(
            server, fp8_folders[1], attn_implementation=register_rounded_kv_attention({})
        )
    finally:
        server.stop()
