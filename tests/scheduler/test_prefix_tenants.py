"""CHECKLIST row 27: two tenants sending the same prompt prefix.

Each tenant's output must equal what it gets alone (the fake worker reads its context back
through the block table, so a wrong shared block changes the tokens), and the prefix-cache
keys must be SHA-256 chains: recomputed here from the documented formula with hashlib, not
with the scheduler's own helper.
"""

from __future__ import annotations

import pytest

from .test_scheduler import reference_outputs
from .utils import block_key_chain, cached_keys, gen_request, make_engine, run_to_completion

BS = 4
SHARED = list(range(300, 316))  # 4 full blocks
TENANT_A = SHARED + [11, 12, 13, 14, 15, 16]
TENANT_B = SHARED + [21, 22, 23]


def chain(tokens: list[int], extra_key: bytes = b"") -> list[bytes]:
    return block_key_chain(tokens, BS, extra_key=extra_key)


def computed_tokens(prompt: list[int], output: list[int]) -> list[int]:
    # NOTE: the last sampled token is never fed back, so its KV is never computed.
    return prompt + output[:-1]


@pytest.mark.parametrize("b_arrives_after_steps", [0, 3, None], ids=["same-step", "mid", "after"])
@pytest.mark.parametrize("num_blocks", [64, 12], ids=["ample", "tight"])
def test_two_tenants_same_prefix_match_alone_and_share_blocks(b_arrives_after_steps, num_blocks):
    """B arrives with A (same step), while A decodes, or after A finished. With 12 blocks the
    two fit only by sharing the prefix (7 + 7 blocks unshared) or by preempting one."""
    ref = reference_outputs([TENANT_A, TENANT_B])
    engine, _ = make_engine(num_blocks=num_blocks, block_size=BS)
    engine.scheduler.add_request(gen_request("r0", TENANT_A))
    outs: dict[str, list[int]] = {"r0": [], "r1": []}
    cached_b = []
    steps = 0
    added_b = False
    while engine.has_work or not added_b:
        if not added_b and (
            steps == b_arrives_after_steps
            or (b_arrives_after_steps is None and not engine.has_work)
        ):
            engine.scheduler.add_request(gen_request("r1", TENANT_B))
            added_b = True
        for o in engine.step():
            outs[o.request_id].extend(o.token_ids)
            if o.request_id == "r1" and o.num_cached_tokens >= 0:
                cached_b.append(o.num_cached_tokens)
        steps += 1
        assert steps < 1000
    assert outs["r0"] == ref["r0"][0] and outs["r1"] == ref["r1"][0]
    if b_arrives_after_steps != 0:
        # A's prefix blocks were computed before B was scheduled: B reads all 4 of them.
        assert cached_b and cached_b[0] == len(SHARED), cached_b
    assert engine.scheduler.kv.num_free_blocks == num_blocks  # nothing held afterwards
    keys = cached_keys(engine)
    expect_a = chain(computed_tokens(TENANT_A, outs["r0"]))
    expect_b = chain(computed_tokens(TENANT_B, outs["r1"]))
    # The shared prefix has one key chain; past it the chains part.
    assert expect_a[:4] == expect_b[:4] == chain(SHARED)
    assert expect_a[4] != expect_b[4]
    if num_blocks == 64:  # nothing was evicted: every full block is in the cache
        assert set(keys) == set(expect_a) | set(expect_b)
    else:
        assert set(keys) <= set(expect_a) | set(expect_b) and keys


def test_keys_are_chains_not_block_contents():
    """The same four tokens after a different prefix are a different block: no hit."""
    engine, _ = make_engine(num_blocks=64, block_size=BS)
    engine.scheduler.add_request(gen_request("a", TENANT_A, 2))
    run_to_completion(engine)
    kv = engine.scheduler.kv
    moved = SHARED[4:8] + SHARED[:4] + [1]  # A's blocks 1 and 0, swapped
    hits_before = kv.prefix_hits
    engine.scheduler.add_request(gen_request("b", moved, 2))
    run_to_completion(engine)
    assert kv.prefix_hits == hits_before
    assert chain(moved)[0] in cached_keys(engine)  # cached under its own chain
    assert chain(moved)[0] != chain(SHARED)[1]


def test_tenants_on_different_adapters_do_not_share_blocks():
    """Same prompt, different LoRA adapters: the adapter is in every key, so no block is
    shared and each keeps its own chain."""
    engine, _ = make_engine(num_blocks=64, block_size=BS, enable_lora=True)
    kv = engine.scheduler.kv
    engine.scheduler.add_request(gen_request("a", TENANT_A, 2))
    run_to_completion(engine)
    hits_before = kv.prefix_hits
    req = gen_request("b", TENANT_A, 2)
    req.lora_name, req.lora_path = "tenant-b-adapter", "/adapters/tenant-b"
    engine.scheduler.add_request(req)
    run_to_completion(engine)
    assert kv.prefix_hits == hits_before
    keys = cached_keys(engine)
    own = chain(TENANT_A, b"tenant-b-adapter\x00" + (0).to_bytes(8, "little"))
    assert own[0] in keys and chain(TENANT_A)[0] in keys and own[0] != chain(TENANT_A)[0]
    # The same adapter loaded again (a new load number: its files may have changed) shares
    # nothing with the earlier load either.
    hits_before = kv.prefix_hits
    req = gen_request("c", TENANT_A, 2)
    req.lora_name, req.lora_path = "tenant-b-adapter", "/adapters/tenant-b"
    req.lora_int_id = 7
    engine.scheduler.add_request(req)
    run_to_completion(engine)
    assert kv.prefix_hits == hits_before
