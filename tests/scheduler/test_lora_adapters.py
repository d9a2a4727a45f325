"""The scheduler owns LoRA adapter identity: one table of names, folders and load numbers that
every front end loads into, unloads from and reads; requests name an adapter and the scheduler
resolves it (torch blocked, fake worker)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from splitserve.entrypoints.launcher import free_port
from splitserve.protos import scheduler_pb2, scheduler_pb2_grpc
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.lora_adapters import AdapterError, AdapterTable
from splitserve.scheduler.scheduler import RequestRejected
from splitserve.scheduler.server import run_scheduler

from .fake_worker import FakeWorkerExecutor
from .test_server import wait_for
from .utils import gen_request, gen_request_proto, make_engine, run_to_completion


def test_every_load_gets_a_fresh_number():
    table = AdapterTable()
    a = table.load("a", "/adapters/a")
    b = table.load("b", "/adapters/b", "base-7b")
    assert (a.int_id, b.int_id) == (1, 2) and b.base_model_name == "base-7b"
    with pytest.raises(AdapterError) as e:
        table.load("a", "/adapters/other")
    assert e.value.code == "ALREADY_EXISTS" and "/adapters/a" in e.value.message
    # A front end's start-up adapter that is loaded already: the loaded one, unchanged.
    assert table.load("a", "/adapters/other", if_absent=True) == a
    assert table.unload("a") == a
    with pytest.raises(AdapterError) as e:
        table.unload("a")
    assert e.value.code == "NOT_FOUND"
    again = table.load("a", "/adapters/a")
    assert again.int_id == 3  # never a number an earlier load had
    assert [x.name for x in table.list()] == ["b", "a"]
    with pytest.raises(AdapterError) as e:
        table.load("", "/adapters/x")
    assert e.value.code == "INVALID_ARGUMENT"


def test_lora_modules_are_loaded_at_start():
    engine, _ = make_engine(
        enable_lora=True,
        lora_modules=["a=adapters/a", '{"name": "b", "path": "/abs/b", "base_model_name": "m"}'],
    )
    table = engine.scheduler.adapters
    a, b = table.get("a"), table.get("b")
    assert a.path.endswith("/adapters/a") and a.path.startswith("/")  # made absolute
    assert (b.path, b.base_model_name, b.int_id) == ("/abs/b", "m", 2)
    with pytest.raises(ValueError, match="need --enable-lora"):
        make_engine(lora_modules=["a=/adapters/a"])


def _named(rid: str, name: str, max_tokens: int = 4, **lora):
    req = gen_request(rid, [5, 6, 7, 8, 9], max_tokens)
    req.lora_name = name
    for k, v in lora.items():
        setattr(req, k, v)
    return req


def test_requests_name_the_adapter_and_the_scheduler_resolves_it():
    engine, ex = make_engine(num_blocks=100, enable_lora=True, max_loras=2)
    sched = engine.scheduler
    x = sched.adapters.load("x", "/adapters/x")
    sent: dict[str, tuple[str, str, int]] = {}
    original = sched.schedule

    def watch():
        step = original()
        if step is not None:
            for m in step.new_requests:
                sent[m.request_id] = (m.lora_name, m.lora_path, m.lora_int_id)
        return step

    sched.schedule = watch
    sched.add_request(_named("by-name", "x"))
    sched.add_request(_named("same-number", "x", lora_int_id=x.int_id, lora_path="/adapters/x"))
    # A name the table does not hold, with its folder: the direct caller's form, as before.
    sched.add_request(_named("direct", "y", lora_path="/adapters/y", lora_int_id=9))
    got = run_to_completion(engine)
    assert set(got) == {"by-name", "same-number", "direct"}
    assert sent["by-name"] == sent["same-number"] == ("x", "/adapters/x", x.int_id)
    assert sent["direct"] == ("y", "/adapters/y", 9)

    for bad, match in (
        (_named("r1", "x", lora_path="/elsewhere"), "not the folder"),
        (_named("r2", "x", lora_int_id=x.int_id + 5), "not the load number"),
    ):
        with pytest.raises(RequestRejected, match=match) as e:
            sched.add_request(bad)
        assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(RequestRejected, match="not loaded") as e:
        sched.add_request(_named("r3", "nobody"))
    assert e.value.code == "NOT_FOUND"
    assert sched.kv.num_free_blocks == 100


def test_unload_lets_running_requests_finish_and_refuses_new_ones():
    engine, _ = make_engine(num_blocks=100, enable_lora=True, max_loras=2)
    sched = engine.scheduler
    first = sched.adapters.load("x", "/adapters/x")
    sched.add_request(_named("old", "x", max_tokens=6))
    first_tokens = sum(len(o.token_ids) for o in engine.step())  # running on the first load
    assert first_tokens == 1
    sched.adapters.unload("x")
    with pytest.raises(RequestRejected) as e:
        sched.add_request(_named("late", "x"))
    assert e.value.code == "NOT_FOUND"
    second = sched.adapters.load("x", "/adapters/x")
    new = sched.add_request(_named("new", "x"))
    old = sched.requests["old"]
    # Two loads of one name are two adapters: the old request keeps its load's number.
    assert (old.lora_int_id, new.lora_int_id) == (first.int_id, second.int_id)
    got = run_to_completion(engine)
    assert first_tokens + len(got["old"][0]) == 6 and len(got["new"][0]) == 4
    assert sched.kv.num_free_blocks == 100


@pytest.fixture(scope="module")
def lora_scheduler():
    addr = f"127.0.0.1:{free_port()}"
    config = SchedulerConfig(
        block_size=4, max_model_len=512, enable_lora=True, max_loras=2,
        lora_modules=["start=/adapters/start"],
    )  # fmt: skip
    loop = asyncio.new_event_loop()
    stop = {}

    def run():
        asyncio.set_event_loop(loop)
        stop["task"] = loop.create_task(
            run_scheduler(
                config,
                addr,
                executor_factory=lambda: FakeWorkerExecutor(64, max_model_len=1024),
            )
        )
        try:
            loop.run_until_complete(stop["task"])
        except asyncio.CancelledError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ch = grpc.insecure_channel(addr)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)

    def up():
        try:
            stub.GetModelInfo(scheduler_pb2.GetModelInfoRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False

    wait_for(up, what="scheduler up")
    yield stub
    loop.call_soon_threadsafe(stop["task"].cancel)
    t.join(10)
    ch.close()


def test_adapter_rpcs(lora_scheduler):
    stub = lora_scheduler

    def names():
        resp = stub.ListLoRAAdapters(scheduler_pb2.ListLoRAAdaptersRequest())
        return [(a.lora_name, a.lora_path, a.lora_int_id) for a in resp.adapters]

    assert names() == [("start", "/adapters/start", 1)]
    loaded = stub.LoadLoRAAdapter(
        scheduler_pb2.LoadLoRAAdapterRequest(lora_name="x", lora_path="/adapters/x")
    )
    assert (loaded.lora_name, loaded.lora_int_id) == ("x", 2)
    with pytest.raises(grpc.RpcError) as e:
        stub.LoadLoRAAdapter(
            scheduler_pb2.LoadLoRAAdapterRequest(lora_name="x", lora_path="/adapters/y")
        )
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    same = stub.LoadLoRAAdapter(
        scheduler_pb2.LoadLoRAAdapterRequest(lora_name="x", lora_path="/y", if_absent=True)
    )
    assert (same.lora_path, same.lora_int_id) == ("/adapters/x", 2)
    assert names() == [("start", "/adapters/start", 1), ("x", "/adapters/x", 2)]

    # A request naming the adapter runs on it (the fake worker needs no folder).
    req = gen_request_proto("by-name", [1, 2, 3], max_tokens=3)
    req.lora_name = "x"
    assert sum(len(r.token_ids) for r in stub.Generate(req, timeout=30)) == 3

    stub.UnloadLoRAAdapter(scheduler_pb2.UnloadLoRAAdapterRequest(lora_name="x"))
    with pytest.raises(grpc.RpcError) as e:
        stub.UnloadLoRAAdapter(scheduler_pb2.UnloadLoRAAdapterRequest(lora_name="x"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    req = gen_request_proto("after-unload", [1, 2, 3], max_tokens=3)
    req.lora_name = "x"
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "not loaded" in e.value.details()
    assert names() == [("start", "/adapters/start", 1)]


class _WorkerMirror:
    """What a worker holds when it does exactly what the step messages say."""

    def __init__(self) -> None:
        self.cpu: set[tuple[str, int]] = set()
        self.slots: dict[int, tuple[str, int]] = {}
        self.request_key: dict[str, tuple[str, int]] = {}

    def apply(self, step, max_loras: int, max_cpu: int) -> set[tuple[str, int]]:
        for rid in step.finished_request_ids:
            self.request_key.pop(rid, None)
        for key in step.lora_evictions:
            assert key not in self.request_key.values(), f"{key} evicted while in use"
            self.cpu.discard(key)
            self.slots = {s: k for s, k in self.slots.items() if k != key}
        for m in step.new_requests:
            if m.lora_name:
                key = (m.lora_name, m.lora_int_id)
                self.cpu.add(key)  # read from disk if it was not held
                self.request_key[m.request_id] = key
        for key, slot in step.lora_slots:
            assert 0 <= slot < max_loras and key in self.cpu
            self.slots[slot] = key
        assert len(self.cpu) <= max_cpu, self.cpu
        used = {self.request_key[r] for r in step.num_scheduled_tokens if r in self.request_key}
        assert used <= set(self.slots.values()), (used, self.slots)
        return used


@pytest.mark.parametrize("max_loras, max_cpu", [(1, 1), (1, 3), (2, 2), (2, 3)])
def test_step_messages_keep_workers_within_the_limits(max_loras, max_cpu):
    """The scheduler's LRU and slot table, followed literally by a worker, keep every step's
    adapters on the device, never evict an adapter a request uses, and never hold more than
    max_cpu_loras; a warm adapter is not evicted while there is room."""
    engine, _ = make_engine(
        num_blocks=300, enable_lora=True, max_loras=max_loras, max_cpu_loras=max_cpu
    )
    sched = engine.scheduler
    for name in "abcd":
        sched.adapters.load(name, f"/adapters/{name}")
    mirror = _WorkerMirror()
    original = sched.schedule
    evicted: list[tuple[str, int]] = []

    def watch():
        step = original()
        if step is not None:
            evicted.extend(step.lora_evictions)
            mirror.apply(step, max_loras, max_cpu)
        return step

    sched.schedule = watch
    release = sched.release_step

    def watch_release():
        step = release()
        if step is not None:
            mirror.apply(step, max_loras, max_cpu)
        return step

    sched.release_step = watch_release
    order = ["a", "b", "", "a", "c", "d", "a", "b", "c", "", "d", "a"]
    for i, name in enumerate(order):
        sched.add_request(_named(f"r{i}", name, max_tokens=3 + i % 4))
    got = run_to_completion(engine)
    assert len(got) == len(order)
    assert len(mirror.cpu) == min(max_cpu, 4)
    if max_cpu >= 4:
        assert evicted == []
    else:
        assert evicted  # four adapters through fewer places
    assert sched.kv.num_free_blocks == 300


def test_unloaded_adapter_leaves_memory_once_its_requests_finish():
    engine, _ = make_engine(num_blocks=100, enable_lora=True, max_loras=2, max_cpu_loras=4)
    sched = engine.scheduler
    x = sched.adapters.load("x", "/adapters/x")
    sched.adapters.load("y", "/adapters/y")
    steps = []
    original = sched.schedule

    def watch():
        step = original()
        if step is not None:
            steps.append(step)
        return step

    sched.schedule = watch
    sched.add_request(_named("rx", "x", max_tokens=5))
    engine.step()
    sched.adapters.unload("x")
    sched.add_request(_named("ry", "y", max_tokens=8))
    engine.step()
    assert all((x.name, x.int_id) not in s.lora_evictions for s in steps)  # still in use
    run_to_completion(engine)
    dropped = [s for s in steps if (x.name, x.int_id) in s.lora_evictions]
    assert len(dropped) == 1 and "rx" in set().union(*(s.finished_request_ids for s in steps))
    assert (x.name, x.int_id) not in sched.lora_residency.cpu
    assert ("y", 2) in sched.lora_residency.cpu  # the served one stays warm


def test_adapter_requests_may_use_the_extra_vocabulary():
    """Prompt ids past the vocabulary (1000) are let through to --lora-extra-vocab-size for a
    request with an adapter (the worker checks what that adapter adds), never without one."""
    engine, _ = make_engine(enable_lora=True, lora_extra_vocab_size=16)
    sched = engine.scheduler
    sched.adapters.load("x", "/adapters/x")
    req = _named("ok", "x")
    req.prompt_token_ids = [5, 1000, 1015]
    sched.add_request(req)
    too_far = _named("far", "x")
    too_far.prompt_token_ids = [5, 1016]
    with pytest.raises(RequestRejected, match=r"1016 is outside the vocabulary \[0, 1016\)"):
        sched.add_request(too_far)
    with pytest.raises(RequestRejected, match=r"1000 is outside the vocabulary \[0, 1000\)"):
        sched.add_request(gen_request("base", [5, 1000]))
    plain, _ = make_engine(enable_lora=True)
    plain.scheduler.adapters.load("x", "/adapters/x")
    with pytest.raises(RequestRejected, match=r"\[0, 1000\)"):
        plain.scheduler.add_request(req)
