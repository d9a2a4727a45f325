"""LoRA adapters against peft + transformers on the same tiny random weights (float32, CPU).

Each adapter is made here with peft (lora_B randomized: peft starts it at zero), saved with
save_pretrained, and served through `LLM` (scheduler + worker in one process).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from splitserve import LLM, SamplingParams
from splitserve.common.lora import LoRARequest
from splitserve.common.messages_proto import generate_request_from_proto

from .lora_utils import make_adapter, peft_greedy

MAX_TOKENS = 12
PROMPTS = [[11, 57, 300, 42, 9, 610, 77], [5, 900, 13, 250, 88], [400, 401, 402]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, model_factory, tmp_path_factory):
    base = model_factory(request.param)
    root = tmp_path_factory.mktemp(f"loras_{request.param}")
    a = make_adapter(base, root / "a", ["q_proj", "k_proj", "v_proj", "o_proj"], 8, 16, 1)
    b = make_adapter(
        base,
        root / "b",
        ["gate_proj", "up_proj", "down_proj", "v_proj"],
        4,
        8,
        2,
        use_rslora=True,
        fmt="bin",
    )
    expected = {
        name: peft_greedy(base, path, PROMPTS, MAX_TOKENS)
        for name, path in (("a", a), ("b", b), ("", None))
    }
    llm = LLM(str(base), enable_lora=True, lora_root=str(root), max_loras=2, max_lora_rank=8)
    yield llm, root, expected
    llm.shutdown()


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_each_adapter_matches_peft(setup):
    llm, root, expected = setup
    assert expected["a"] != expected[""] and expected["b"] != expected[""]  # adapters matter
    for name in ("a", "b"):
        req = LoRARequest(name, 1, str(root / name))
        outs = llm.generate(PROMPTS, GREEDY, lora_request=req)
        assert [o.outputs[0].token_ids for o in outs] == expected[name], name
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected[""]


def test_mixed_batch_rows_match_alone(setup):
    llm, root, expected = setup
    a, b = (LoRARequest(n, i, str(root / n)) for i, n in enumerate("ab", 1))
    # Every prompt three times: through a, through b and through the base, in one batch.
    prompts = PROMPTS * 3
    loras = [a] * len(PROMPTS) + [b] * len(PROMPTS) + [None] * len(PROMPTS)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=loras)]
    n = len(PROMPTS)
    assert outs[:n] == expected["a"]
    assert outs[n : 2 * n] == expected["b"]
    assert outs[2 * n :] == expected[""]
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.pool.num_blocks  # nothing held after the batch


def test_refusals(setup, tmp_path):
    llm, root, _ = setup
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    link = root / "escape"
    if not link.exists():
        os.symlink(outside, link)
    for path in ("../outside", str(outside), str(link), str(root / ".." / "x")):
        # NOTE: refused before it runs when the LLM looks for the adapter's tokenizer
        # (ValueError), else by the worker (the request fails: RuntimeError).
        with pytest.raises((RuntimeError, ValueError), match="outside the allowed root"):
            llm.generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest("bad", 9, path))
    # An unsupported config is refused by name.
    cfg = json.loads((root / "a" / "adapter_config.json").read_text())
    dora = root / "dora"
    dora.mkdir(exist_ok=True)
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(RuntimeError, match="DoRA"):
        llm.generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest("dora", 3, str(dora)))
    # The engine still serves afterwards.
    assert llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids


def test_cpu_lru_evicts_idle_adapters_and_reloads_them(setup):
    """The scheduler keeps the CPU LRU (max_cpu_loras, default max_loras) and the slot table;
    the worker holds exactly what it is told."""
    llm, root, expected = setup
    manager = llm.engine.executor.runner.lora
    residency = llm.engine.scheduler.lora_residency
    assert residency.max_cpu == 2 and manager.max_loras == 2
    c = root / "c"
    if not c.exists():
        shutil.copytree(root / "a", c)  # same weights as a, under another name
    reqs = {n: LoRARequest(n, i, str(root / n)) for i, n in enumerate("abc", 1)}
    evictions = residency.num_evictions
    for name in ("a", "b", "c"):
        llm.generate(PROMPTS[:1], GREEDY, lora_request=reqs[name])
    assert residency.num_evictions > evictions
    assert list(residency.cpu) == [("b", 2), ("c", 3)]  # a, least recently used, went first
    assert set(manager.cpu) == {("b", 2), ("c", 3)}  # the worker follows
    assert manager.slots == {i: k for i, k in enumerate(residency.slots) if k is not None}
    assert set(manager.slots.values()) <= {("b", 2), ("c", 3)}
    # Finished requests let go of their adapter (the worker hears of it with the next step).
    assert set(manager.request_adapter.values()) <= {("c", 3)}
    outs = llm.generate(PROMPTS, GREEDY, lora_request=reqs["a"])  # read again from disk
    assert [o.outputs[0].token_ids for o in outs] == expected["a"]
    assert list(residency.cpu) == [("c", 3), ("a", 1)]
    assert set(manager.cpu) == {("c", 3), ("a", 1)}
    assert set(manager.request_adapter.values()) <= {("a", 1)}


def test_pipeline_ranks_load_only_their_layers(model_factory, tmp_path):
    from splitserve.worker.config import WorkerConfig
    from splitserve.worker.lora import LoRAManager
    from splitserve.worker.model_loader import load_model

    base = model_factory("llama")
    make_adapter(base, tmp_path / "ad", ["q_proj", "down_proj"], 4, 8, 5)
    for rank in (0, 1):
        cfg = WorkerConfig(
            model=str(base),
            pipeline_parallel_size=2,
            rank=rank,
            master_port=1,
            enable_lora=True,
            lora_root=str(tmp_path),
        )
        loaded = load_model(cfg)
        manager = LoRAManager(cfg, loaded.model, loaded.device, loaded.dtype)
        assert manager.add_request("r", "ad", "ad") is None
        assert sorted(manager.cpu[("ad", 0)].weights) == [
            f"model.layers.{rank}.mlp.down_proj",
            f"model.layers.{rank}.self_attn.qkv_proj",
        ]


def test_reload_serves_new_files_while_a_running_request_keeps_the_old(setup, tmp_path):
    """An adapter rewritten on disk and loaded again (a new load number, as the gateway gives
    every /v1/load_lora_adapter) serves the new weights, from the first prompt token on (no
    prefix-cache block of the old load is reused), while a request already running on the old
    load finishes on the old weights."""
    from splitserve.protos import scheduler_pb2

    llm, root, _ = setup
    path = root / "reloaded"
    shutil.rmtree(path, ignore_errors=True)
    targets = ["q_proj", "v_proj", "down_proj"]
    base_path = llm.worker_config.model
    make_adapter(base_path, path, targets, 4, 8, seed=21)
    new = make_adapter(base_path, tmp_path / "new", targets, 4, 8, seed=22)
    prompt = list(range(30, 70))  # several full blocks: the prefix cache would serve them
    old_want = peft_greedy(base_path, path, [prompt], MAX_TOKENS)[0]
    new_want = peft_greedy(base_path, new, [prompt], MAX_TOKENS)[0]
    assert old_want != new_want

    engine, sched = llm.engine, llm.engine.scheduler
    sp = GREEDY.to_proto()

    def add(rid: str, int_id: int) -> None:
        sched.add_request(
            generate_request_from_proto(
                scheduler_pb2.GenerateRequest(
                    request_id=rid,
                    prompt_token_ids=prompt,
                    sampling_params=sp,
                    lora_name="reloaded",
                    lora_path=str(path),
                    lora_int_id=int_id,
                )
            )
        )

    got: dict[str, list[int]] = {"old": [], "new": []}

    def step() -> None:
        for out in engine.step():
            assert not out.error, out.error
            got[out.request_id].extend(out.token_ids)

    add("old", 101)
    while len(got["old"]) < 2:  # running, with the old weights in use
        step()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(new / f, path / f)  # rewritten in place, same name and path
    add("new", 102)
    while engine.has_work:
        step()
    assert got["old"] == old_want
    assert got["new"] == new_want
    # A third request on the new load matches too (its prefix-cache hits are the new load's).
    got["new"] = []
    add("new", 102)
    while engine.has_work:
        step()
    assert got["new"] == new_want
    manager = engine.executor.runner.lora
    assert ("reloaded", 102) in manager.cpu
    assert not any(k[0] == "reloaded" for k in manager.request_adapter.values())


def test_one_load_number_for_two_paths_is_refused_while_in_use(setup):
    """Two paths under one (name, lora_int_id) in one batch: the second request fails by
    name instead of swapping the weights under the first."""
    llm, root, _ = setup
    a, b = LoRARequest("a", 1, str(root / "a")), LoRARequest("a", 1, str(root / "b"))
    with pytest.raises(RuntimeError, match="lora_int_id 1 is in use"):
        llm.generate(PROMPTS[:2], GREEDY, lora_request=[a, b])
    assert llm.engine.scheduler.kv.num_free_blocks == llm.engine.scheduler.kv.pool.num_blocks


def test_adapter_on_an_fp8_base_matches_peft_on_its_dequantized_weights(model_factory, tmp_path):
    """LoRA wraps the base layer whatever its quant method: a block-wise FP8 checkpoint with an
    adapter gives peft's tokens on the dequantized base."""
    from splitserve.testing.fp8_pack import pack_checkpoint

    fp8, dense = pack_checkpoint(model_factory("llama"), tmp_path / "fp8", "fp8-block")
    adapter = make_adapter(
        dense, tmp_path / "loras" / "a", ["q_proj", "v_proj", "down_proj"], 8, 16, 3
    )
    expected = peft_greedy(dense, adapter, PROMPTS, MAX_TOKENS)
    llm = LLM(str(fp8), enable_lora=True, lora_root=str(tmp_path / "loras"), max_lora_rank=8)
    try:
        outs = llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("a", 1, str(adapter)))
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.shutdown()
