"""`splitserve serve` on a tiny MiniMax-VL-01: chat images of two shapes (two tile grids, so two
placeholder counts) sent as data: URLs through the gateway, the tokenizer service's processor,
the scheduler (state slots and paged blocks) and the worker give the tokens of the oracle
composed from transformers' pieces (tests/models/test_minimax_vl.py)."""

from __future__ import annotations

import openai
import pytest

from tests.models.llava_utils import random_image
from tests.models.minimax_vl_utils import build_minimax_vl
from tests.models.test_minimax_vl import hf_greedy

from .conftest import Server
from .test_images import QUESTION, N, messages


@pytest.fixture(scope="module")
def vl_server(tiny_model, tmp_path_factory):
    path = build_minimax_vl(tmp_path_factory.mktemp("e2e-minimax-vl") / "m", tiny_model)
    s = Server(path, [], tmp_path_factory.mktemp("logs") / "minimax-vl.log")
    yield s
    s.stop()


def test_image_chat_matches_composed_transformers(vl_server):
    import transformers

    client = openai.OpenAI(
        base_url=vl_server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )
    tok = transformers.AutoTokenizer.from_pretrained(vl_server.model)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{QUESTION}"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    images = [random_image(7, size=(40, 30)), random_image(8, size=(60, 30))]
    want = hf_greedy(vl_server.model, [(prompt, [0]), (prompt, [1])], images)
    got = []
    for image in images:
        resp = client.chat.completions.create(
            model=vl_server.model,
            messages=messages(image),
            max_tokens=N,
            temperature=0,
            logprobs=True,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        got.append([int(t.token.split(":")[1]) for t in resp.choices[0].logprobs.content])
    assert got == want
    assert got[0] != got[1]
