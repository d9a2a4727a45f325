"""LoRA in the scheduler: at most --max-loras distinct adapters among running requests (so in
any step), the rest wait; adapters travel to the workers with new requests."""

from __future__ import annotations

import pytest

from splitserve.scheduler.scheduler import RequestRejected

from .utils import gen_request, make_engine, run_to_completion


def _lora(rid: str, name: str, max_tokens: int = 6):
    req = gen_request(rid, [5, 6, 7, 8, 9], max_tokens)
    if name:
        req.lora_name, req.lora_path = name, f"/adapters/{name}"
    return req


@pytest.mark.parametrize("max_loras", [1, 2])
def test_steps_hold_at_most_max_loras_adapters(max_loras):
    engine, _ = make_engine(num_blocks=200, enable_lora=True, max_loras=max_loras)
    sched = engine.scheduler
    names = ["x", "y", "z", "", "x", "y", ""]
    for i, name in enumerate(names):
        sched.add_request(_lora(f"r{i}", name))
    seen_new: dict[str, tuple[str, str]] = {}
    per_step: list[set[str]] = []
    first_step: set[str] = set()

    original = sched.schedule

    def watch():
        step = original()
        if step is not None:
            for new in step.new_requests:
                seen_new[new.request_id] = (new.lora_name, new.lora_path)
            if not first_step:
                first_step.update(step.num_scheduled_tokens)
            running = {r.request_id: r.lora_name for r in sched.running}
            per_step.append({running[rid] for rid in step.num_scheduled_tokens} - {""})
        return step

    sched.schedule = watch
    got = run_to_completion(engine)
    assert set(got) == {f"r{i}" for i in range(len(names))}
    assert all(len(toks) == 6 for toks, _ in got.values())
    assert max(len(s) for s in per_step) == max_loras
    # Base-model requests are never held back by adapter slots: all run in the first step.
    assert {"r3", "r6"} <= first_step
    assert {"r0", "r4"} <= first_step and ("r1" in first_step) == (max_loras == 2)
    for i, name in enumerate(names):
        assert seen_new[f"r{i}"] == ((name, f"/adapters/{name}") if name else ("", ""))
    assert sched.kv.num_free_blocks == 200


def test_lora_request_refused_without_enable_lora():
    engine, _ = make_engine()
    with pytest.raises(RequestRejected, match="--enable-lora"):
        engine.scheduler.add_request(_lora("r", "x"))
    engine, _ = make_engine(enable_lora=True)
    req = _lora("r", "x")
    req.lora_path = ""
    with pytest.raises(RequestRejected, match="lora_path"):
        engine.scheduler.add_request(req)


def test_two_loads_of_one_name_are_two_adapters():
    """An adapter reloaded while a request of the old load runs needs a slot of its own (the
    worker holds both weights): with max_loras=1 the new load waits; the load number reaches
    the workers."""
    engine, _ = make_engine(num_blocks=200, enable_lora=True, max_loras=1)
    sched = engine.scheduler
    old, new = _lora("old", "x"), _lora("new", "x")
    old.lora_int_id, new.lora_int_id = 1, 2
    sched.add_request(old)
    sched.add_request(new)
    sent: list[dict[str, int]] = []
    original = sched.schedule

    def watch():
        step = original()
        if step is not None and step.new_requests:
            sent.append({m.request_id: m.lora_int_id for m in step.new_requests})
        return step

    sched.schedule = watch
    got = run_to_completion(engine)
    assert sent == [{"old": 1}, {"new": 2}]  # never both at once
    assert set(got) == {"old", "new"} and sched.kv.num_free_blocks == 200
