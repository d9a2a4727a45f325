"""`splitserve serve --generation-config FOLDER --override-generation-config JSON`: the
defaults travel from the worker (which reads the file) through the scheduler's ModelInfo to
the gateway, which applies them to requests that leave the fields unset."""

from __future__ import annotations

import json

import openai
import pytest

from .conftest import Server


@pytest.fixture(scope="module")
def gen_server(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    # temperature 0: greedy by default; max_new_tokens 4, which the override replaces by 6.
    (folder / "generation_config.json").write_text(
        json.dumps({"temperature": 0.0, "max_new_tokens": 4})
    )
    s = Server(
        tiny_model,
        [
            "--generation-config",
            str(folder),
            "--override-generation-config",
            '{"max_new_tokens": 6}',
        ],
        tmp_path_factory.mktemp("logs") / "gen.log",
    )
    yield s
    s.stop()


def test_defaults_travel_worker_scheduler_gateway(gen_server):
    client = openai.OpenAI(base_url=gen_server.url + "/v1", api_key="x", max_retries=0)
    model = gen_server.model
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.completion_tokens == 6  # the override's max_new_tokens
    assert chat.choices[0].finish_reason == "length"
    # temperature 0 from the file: different seeds give the same (greedy) tokens.
    texts = {
        client.completions.create(
            model=model, prompt="one two", seed=seed, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for seed in (1, 2, 3)
    }
    assert len(texts) == 1
    # An explicit value still wins.
    cmpl = client.completions.create(
        model=model, prompt="one two", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert cmpl.usage.completion_tokens == 2
    log = gen_server.log.read_text()
    assert log.count("Default sampling parameters come from") == 1, log[-3000:]
    assert "temperature=0.0, max_tokens=6" in log
