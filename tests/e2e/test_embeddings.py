"""`splitserve serve --runner pooling` (two pipeline ranks: the last one pools) answering the
OpenAI client's embeddings.create with transformers' vectors: the last token's final hidden
state, L2-normalized; generation refused with a 400 naming the runner."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from .conftest import Server

TEXTS = ["The quick brown fox", "jumps over the lazy dog and keeps running far away", "a"]


@pytest.fixture(scope="module")
def pooling_server(tiny_model, tmp_path_factory):
    flags = [
        "--runner",
        "pooling",
        "--pipeline-parallel-size",
        "2",
        # Several prefill chunks per prompt, several steps in flight across the ranks.
        "--max-num-batched-tokens",
        "8",
    ]
    s = Server(tiny_model, flags, tmp_path_factory.mktemp("logs") / "pooling.log")
    yield s
    assert s.stop() == 0


def expected(model_dir, ids: list[int]) -> np.ndarray:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        last = hf(torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(last, dim=-1).numpy()


def test_embeddings_match_transformers(pooling_server, tiny_model):
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=pooling_server.url + "/v1", api_key="x", max_retries=0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = [tok.encode(t, add_special_tokens=True) for t in TEXTS] + [[7, 8, 9, 10, 11]]
    out = client.embeddings.create(model=str(tiny_model), input=[*TEXTS])
    out_ids = client.embeddings.create(
        model=str(tiny_model), input=[[7, 8, 9, 10, 11]], encoding_format="float"
    )
    vectors = [d.embedding for d in out.data] + [out_ids.data[0].embedding]
    assert out.usage.prompt_tokens == sum(len(i) for i in ids[:3])
    for prompt, got in zip(ids, vectors, strict=True):
        np.testing.assert_allclose(got, expected(tiny_model, prompt), atol=3e-5)

    with pytest.raises(openai.BadRequestError, match="--runner pooling"):
        client.completions.create(model=str(tiny_model), prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="--runner pooling"):
        client.chat.completions.create(
            model=str(tiny_model), messages=[{"role": "user", "content": "hi"}], stream=True
        )
    stats = pooling_server.scheduler_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
