"""LoRA adapters through every process: `splitserve serve --enable-lora --lora-modules ...`.

/v1/models lists the adapters (parent: the base model); model="a" gives peft's greedy output;
unknown models are 404; runtime loads refuse paths outside the root with a 400.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import httpx
import openai
import pytest

from tests.models.lora_utils import make_adapter, peft_greedy

from .conftest import Server, free_port, wait_for

PROMPT = [11, 57, 300, 42, 9, 610, 77]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def lora_setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_root")
    a = make_adapter(tiny_model, root / "a", ["q_proj", "v_proj", "o_proj", "down_proj"], 8, 16, 3)
    b = make_adapter(tiny_model, root / "b", ["k_proj", "gate_proj", "up_proj"], 4, 4, 4)
    shutil.copytree(b, root / "spare")  # loaded at runtime under another name
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(b, outside / "evil")
    os.symlink(outside / "evil", root / "escape")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        server = Server(
            tiny_model,
            [
                "--enable-lora",
                "--lora-root",
                str(root),
                "--lora-modules",
                f"a={a}",
                f'{{"name": "b", "path": "{b}"}}',
                "--max-loras",
                "2",
                "--max-lora-rank",
                "8",
                "--max-cpu-loras",
                "2",
            ],
            tmp_path_factory.mktemp("lora_logs") / "serve.log",
        )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    yield server, client, root, outside
    server.stop()


def _complete(client, model: str) -> str:
    out = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.model == model  # as vLLM: an adapter's responses carry its name
    return out.choices[0].text


def test_models_and_adapter_outputs(lora_setup, tiny_model):
    from transformers import AutoTokenizer

    server, client, root, _ = lora_setup
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {server.model, "a", "b"}
    assert cards["a"].parent == server.model and cards["b"].parent == server.model
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = peft_greedy(tiny_model, None, [PROMPT], MAX_TOKENS)[0]
    for name in ("a", "b"):
        want = peft_greedy(tiny_model, root / name, [PROMPT], MAX_TOKENS)[0]
        assert want != base  # the adapter changes the output
        assert _complete(client, name) == tok.decode(want, skip_special_tokens=True), name
    assert _complete(client, server.model) == tok.decode(base, skip_special_tokens=True)
    with pytest.raises(openai.NotFoundError):
        _complete(client, "no-such-adapter")
    # Chat goes through the adapter too (streamed): it differs from the base model's answer.
    msgs = [{"role": "user", "content": "hello there"}]
    texts = {}
    for model in ("a", server.model):
        stream = client.chat.completions.create(
            model=model,
            messages=msgs,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        texts[model] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert texts["a"] != texts[server.model]


def test_runtime_load_path_safety(lora_setup):
    server, client, root, outside = lora_setup
    load = server.url + "/v1/load_lora_adapter"
    for bad in ("../outside/evil", str(outside / "evil"), str(root / "escape"), "spare/../../x"):
        r = httpx.post(load, json={"lora_name": "evil", "lora_path": bad})
        assert r.status_code == 400, (bad, r.text)
        assert "outside the allowed root" in r.json()["error"]["message"]
    assert "evil" not in {m.id for m in client.models.list().data}
    r = httpx.post(load, json={"lora_name": "spare", "lora_path": "spare"})
    assert r.status_code == 200, r.text
    assert _complete(client, "spare") == _complete(client, "b")  # same weights as b
    unload = server.url + "/v1/unload_lora_adapter"
    assert httpx.post(unload, json={"lora_name": "spare"}).status_code == 200
    assert httpx.post(unload, json={"lora_name": "spare"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        _complete(client, "spare")
    assert server.scheduler_stats().num_free_blocks == server.scheduler_stats().num_total_blocks


def test_reload_after_files_change_serves_the_new_weights(lora_setup, tiny_model):
    """Load X at P, generate, rewrite P's files with other weights, unload and load X again:
    the output is peft's on the NEW weights (workers and prefix cache hold nothing stale)."""
    from transformers import AutoTokenizer

    server, client, root, _ = lora_setup
    tok = AutoTokenizer.from_pretrained(tiny_model)
    targets = ["q_proj", "v_proj", "up_proj"]
    path = make_adapter(tiny_model, root / "rewritten", targets, 4, 8, 31)
    new = make_adapter(tiny_model, root.parent / "rewritten_next", targets, 4, 8, 32)
    old_want, new_want = (
        tok.decode(peft_greedy(tiny_model, p, [PROMPT], MAX_TOKENS)[0], skip_special_tokens=True)
        for p in (path, new)
    )
    assert old_want != new_want
    load, unload = server.url + "/v1/load_lora_adapter", server.url + "/v1/unload_lora_adapter"
    body = {"lora_name": "x", "lora_path": "rewritten"}
    assert httpx.post(load, json=body).status_code == 200
    assert _complete(client, "x") == old_want
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(new / f, path / f)  # same name, same path, new contents
    assert httpx.post(unload, json={"lora_name": "x"}).status_code == 200
    assert httpx.post(load, json=body).status_code == 200
    assert _complete(client, "x") == new_want
    assert httpx.post(unload, json={"lora_name": "x"}).status_code == 200
    assert server.scheduler_stats().num_free_blocks == server.scheduler_stats().num_total_blocks


def _lora_info(url: str) -> tuple[dict, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = fams["vllm:lora_requests_info"].samples
    return sample.labels, sample.value


def test_lora_requests_info(lora_setup):
    """vLLM's vllm:lora_requests_info: max_lora from --max-loras, and the adapters of the
    running and waiting requests as labels."""
    server, client, _, _ = lora_setup
    labels, _ = _lora_info(server.url)
    assert labels == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    # NOTE: a long generation, so that it is still running when /metrics is read after its
    # first chunk.
    stream = client.completions.create(
        model="a", prompt=PROMPT, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    try:
        next(iter(stream))
        labels, _ = _lora_info(server.url)
    finally:
        stream.close()
    assert labels["running_lora_adapters"] == "a"
    assert labels["max_lora"] == "2"


def test_two_gateways_share_the_schedulers_adapters(lora_setup, tmp_path):
    """The scheduler owns adapter identity: an adapter loaded through one gateway is served
    and listed by another in front of the same scheduler, and unloaded through either."""
    server, client, root, _ = lora_setup
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "gateway2.log").open("w")
    gw = subprocess.Popen(
        [
            sys.executable, "-m", "splitserve.entrypoints.cli", "gateway",
            "--port", str(port),
            "--scheduler-address", server.scheduler_address,
            "--tokenizer-address", server.tokenizer_address,
            "--enable-lora", "--max-lora-rank", "8", "--lora-root", str(root),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )  # fmt: skip
    try:

        def healthy() -> bool:
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 120, "the second gateway", gw)
        other = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        # The first gateway's --lora-modules are the scheduler's: the second serves them too.
        assert {m.id for m in other.models.list().data} == {server.model, "a", "b"}
        assert _complete(other, "a") == _complete(client, "a")
        # Loaded through the second gateway, then served and listed by the first.
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "s2", "lora_path": "b"})
        assert r.status_code == 200, r.text
        assert "s2" in {m.id for m in client.models.list().data}
        assert _complete(client, "s2") == _complete(client, "b")
        # One name, one adapter: the first gateway cannot load it again.
        r = httpx.post(
            server.url + "/v1/load_lora_adapter", json={"lora_name": "s2", "lora_path": "a"}
        )
        assert r.status_code == 400 and "already in use" in r.json()["error"]["message"]
        # Unloaded through the first: the second (which saw it loaded) refuses it now.
        r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "s2"})
        assert r.status_code == 200, r.text
        with pytest.raises(openai.NotFoundError):
            _complete(other, "s2")
        assert "s2" not in {m.id for m in other.models.list().data}
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "s2"})
        assert r.status_code == 404
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            gw.kill()
    assert server.scheduler_stats().num_free_blocks == server.scheduler_stats().num_total_blocks
