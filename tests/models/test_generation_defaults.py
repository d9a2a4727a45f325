"""The in-process LLM takes the model's generation_config.json defaults (vLLM's
generation_config= / override_generation_config=), and `serve` refuses a bad file at start-up."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from splitserve import LLM, SamplingParams
from splitserve.entrypoints import cli

PROMPTS = ["hello world", "the quick brown fox"]
GEN = {"eos_token_id": [1, 4], "temperature": 0.0, "top_k": 5, "max_new_tokens": 7}


def _with_generation_config(src, dst, gen: dict):
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


@pytest.fixture(scope="module")
def gen_model(llama_path, tmp_path_factory):
    return _with_generation_config(llama_path, tmp_path_factory.mktemp("gen") / "m", GEN)


def test_generate_without_params_uses_the_models_defaults(gen_model, caplog):
    with caplog.at_level(logging.WARNING, logger="splitserve.common.generation_config"):
        llm = LLM(str(gen_model), kv_cache_memory=8 << 20)
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "temperature=0.0, top_k=5, max_tokens=7" in warnings[0]
        assert "--generation-config vllm" in warnings[0]
        assert llm.get_default_sampling_params() == SamplingParams(
            temperature=0.0, top_k=5, max_tokens=7
        )
        # Defaults are a fresh object: changing one does not change the next.
        llm.get_default_sampling_params().temperature = 0.9
        assert llm.get_default_sampling_params().temperature == 0.0
        # temperature 0 from the file: greedy, so the same tokens as explicit greedy params.
        defaulted = llm.generate(PROMPTS)
        explicit = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=7))
        assert [o.outputs[0].token_ids for o in defaulted] == [
            o.outputs[0].token_ids for o in explicit
        ]
        long = llm.generate(
            PROMPTS[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        )
        assert len(long[0].outputs[0].token_ids) == 12  # an explicit max_tokens wins
    finally:
        llm.shutdown()


def test_vllm_mode_and_override(gen_model):
    llm = LLM(
        str(gen_model),
        kv_cache_memory=8 << 20,
        generation_config="vllm",
        override_generation_config={"max_new_tokens": 3},
    )
    try:
        assert llm.get_default_sampling_params() == SamplingParams(max_tokens=3)
        out = llm.generate(PROMPTS[:1])[0].outputs[0]
        assert len(out.token_ids) <= 3 and (len(out.token_ids) == 3 or out.finish_reason == "stop")
    finally:
        llm.shutdown()


def test_llm_refuses_a_bad_override():
    with pytest.raises(ValueError, match="unknown key"):
        LLM("unused", override_generation_config={"temp": 0.5})


def test_serve_refuses_a_bad_generation_config_before_starting(llama_path, tmp_path, capsys):
    bad = _with_generation_config(llama_path, tmp_path / "bad", {"top_p": 1.5})
    assert cli.main(["serve", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "top_p must be in (0, 1], got 1.5" in err
    assert str(bad / "generation_config.json") in err
