"""vLLM's cache_salt: requests share prefix-cache blocks only when their salts are equal.

The keys are recomputed here from the documented formula with hashlib (the salt enters the
first block only, after the LoRA key, as int32 -1 then its length and bytes), not with the
scheduler's own helper.
"""

from __future__ import annotations

from .test_scheduler import reference_outputs
from .utils import block_key_chain, cached_keys, gen_request, make_engine

BS = 4
PROMPT = list(range(300, 318))  # 4 full blocks and 2 tokens


def chain(tokens: list[int], salt: bytes = b"", extra_key: bytes = b"") -> list[bytes]:
    return block_key_chain(tokens, BS, salt, extra_key)


def run_one(engine, rid: str, prompt: list[int], salt: str | None, lora: str = ""):
    """Run one request alone; returns (output tokens, cached prompt tokens)."""
    req = gen_request(rid, prompt, 3)
    if salt is not None:
        req.cache_salt = salt
    if lora:
        req.lora_name, req.lora_path = lora, f"/adapters/{lora}"
    engine.scheduler.add_request(req)
    out: list[int] = []
    cached = None
    steps = 0
    while engine.has_work:
        for o in engine.step():
            out.extend(o.token_ids)
            if o.num_cached_tokens >= 0 and cached is None:
                cached = o.num_cached_tokens
        steps += 1
        assert steps < 1000
    return out, cached


def test_salts_isolate_and_equal_salts_share():
    """none, then salt a, then salt b, then a again, then none again: only the repeats hit,
    each reading all four full prompt blocks; every output equals the unsalted reference."""
    ref = reference_outputs([PROMPT])["r0"][0]
    engine, _ = make_engine(num_blocks=64, block_size=BS)
    expected_cached = {"none1": 0, "a1": 0, "b1": 0, "a2": 16, "none2": 16}
    for rid, salt in [("none1", None), ("a1", "a"), ("b1", "b"), ("a2", "a"), ("none2", None)]:
        out, cached = run_one(engine, rid, PROMPT, salt)
        assert out == ref[: len(out)] and len(out) == 3, rid
        assert cached == expected_cached[rid], (rid, cached)
    computed = PROMPT + ref[:2]  # the last sampled token's KV is never computed
    keys = cached_keys(engine)
    plain, salt_a, salt_b = chain(computed), chain(computed, b"a"), chain(computed, b"b")
    assert set(keys) == set(plain) | set(salt_a) | set(salt_b)
    # The salt is hashed into block 0 only, yet every later key of the chain differs.
    for i in range(len(plain)):
        assert len({plain[i], salt_a[i], salt_b[i]}) == 3, i


def test_salt_with_lora_keeps_both_apart():
    """Same prompt and salt, one on an adapter: no hit; the adapter's salted chain uses both
    keys, and neither request reads the other's blocks."""
    engine, _ = make_engine(num_blocks=64, block_size=BS, enable_lora=True)
    _, c1 = run_one(engine, "s", PROMPT, "tenant")
    _, c2 = run_one(engine, "sl", PROMPT, "tenant", lora="ad")
    _, c3 = run_one(engine, "sl2", PROMPT, "tenant", lora="ad")
    assert (c1, c2, c3) == (0, 0, 16)
    keys = cached_keys(engine)
    adapter = b"ad\x00" + (0).to_bytes(8, "little")  # the adapter's name and load number
    assert chain(PROMPT, b"tenant", adapter)[0] in keys
    assert chain(PROMPT, b"tenant")[0] in keys
    assert chain(PROMPT, b"", adapter)[0] not in keys


def test_salt_cannot_pose_as_an_adapter():
    """No adapter with salt 'x' vs. adapter 'x' without salt: the marker keeps the two first
    blocks' hashed bytes different."""
    assert chain(PROMPT, salt=b"x")[0] != chain(PROMPT, extra_key=b"x")[0]
    engine, _ = make_engine(num_blocks=64, block_size=BS, enable_lora=True)
    run_one(engine, "l", PROMPT, None, lora="x")
    _, cached = run_one(engine, "s", PROMPT, "x")
    assert cached == 0
