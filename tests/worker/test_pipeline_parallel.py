"""Pipeline parallelism: P worker processes joined over gloo, driven by the real scheduler
over gRPC, against one rank and against transformers; each rank's own tensors and KV."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from splitserve.common import messages as msg
from splitserve.entrypoints.launcher import free_port
from splitserve.protos import common_pb2, worker_pb2, worker_pb2_grpc
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.engine_core import EngineCore
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_loader import load_model
from splitserve.worker.model_runner import ModelRunner
from splitserve.worker.pipeline import layer_range

from ..models.utils import StepDriver
from .utils import SharedGrid

NUM_REQUESTS = 32
TRANSFER_TIMEOUT_S = 2.0
"""--distributed-timeout-seconds of the shared pipelines: short, so that the idle test idles
past it quickly and a stopped last rank fails the engine soon."""
STARTUP_S = 180.0


def _workload(vocab_size: int) -> list[tuple[list[int], int]]:
    """32 (prompt, max_tokens) pairs of mixed lengths."""
    rng = random.Random(7)
    return [
        ([rng.randrange(3, vocab_size) for _ in range(rng.randint(1, 60))], rng.randint(2, 12))
        for _ in range(NUM_REQUESTS)
    ]


class PipelineWorkers:
    """`splitserve worker` processes, one per rank, meeting at one tcp:// rendezvous."""

    def __init__(self, model, pp: int, log_dir, timeout_s: float, extra: list[str] = ()) -> None:
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(pp)]
        init = f"tcp://127.0.0.1:{free_port()}"
        self.logs = [log_dir / f"pp{pp}-rank{r}.log" for r in range(pp)]
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "splitserve.entrypoints.cli",
                    "worker",
                    str(model),
                    "--address",
                    addr,
                    "--rank",
                    str(rank),
                    "--pipeline-parallel-size",
                    str(pp),
                    "--distributed-init-method",
                    init,
                    "--distributed-timeout-seconds",
                    str(timeout_s),
                    "--kv-cache-memory",
                    f"{pp - rank}MiB",  # unequal on purpose: the scheduler takes the least
                    *extra,
                ],
                stdout=self.logs[rank].open("w"),
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            for rank, addr in enumerate(self.addresses)
        ]

    def stage_stats(self) -> list[worker_pb2.StageStats]:
        import grpc

        stats = []
        for addr in self.addresses:
            with grpc.insecure_channel(addr) as ch:
                stub = worker_pb2_grpc.WorkerServiceStub(ch)
                stats.append(stub.GetStageStats(worker_pb2.GetStageStatsRequest(), timeout=10))
        return stats

    def kill(self) -> None:
        """SIGKILL: graceful stops are the launcher tests' business, and slow here."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in self.logs)


def _generate(engine: EngineCore, workload) -> dict[str, list[int]]:
    for i, (prompt, n) in enumerate(workload):
        sp = msg.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        engine.scheduler.add_request(
            msg.GenerateRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling_params=sp)
        )
    outs: dict[str, list[int]] = {}
    deadline = time.monotonic() + 120
    while engine.has_work:
        assert time.monotonic() < deadline, "generation did not finish"
        for o in engine.step():
            assert not o.error, o.error
            outs.setdefault(o.request_id, []).extend(o.token_ids)
    return outs


def _config(**kw) -> SchedulerConfig:
    return SchedulerConfig(block_size=16, max_num_batched_tokens=256, max_num_seqs=32, **kw)


@torch.inference_mode()
def _transformers_greedy(path, workload) -> dict[str, list[int]]:
    """transformers greedy decoding of the whole workload as one left-padded batch (one
    generate call keeps this test fast; greedy outputs are prefixes of the longest run)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    width = max(len(p) for p, _ in workload)
    ids = torch.zeros(len(workload), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (prompt, _) in enumerate(workload):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    longest = max(n for _, n in workload)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=longest,
        min_new_tokens=longest,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return {f"r{i}": out[i, width : width + n].tolist() for i, (_, n) in enumerate(workload)}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pp,partition", [(2, None), (3, None), (2, "1,2")])
def test_each_rank_reads_only_its_own_tensors(checkpoint, monkeypatch, tie, pp, partition):
    import safetensors

    path = checkpoint(f"llama_names_{tie}", num_layers=3, tie=tie)
    read: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    counts = [int(c) for c in partition.split(",")] if partition else None
    for rank in range(pp):
        read.clear()
        config = WorkerConfig(
            model=str(path), rank=rank, pipeline_parallel_size=pp, pp_layer_partition=partition
        )
        runner = ModelRunner(config)
        start, end = layer_range(3, rank, pp, counts)
        expected = {
            n for n in read if n.startswith(tuple(f"model.layers.{i}." for i in range(start, end)))
        }
        assert {n.split(".")[2] for n in expected} == {str(i) for i in range(start, end)}
        last = rank == pp - 1
        if rank == 0 or (last and tie):
            expected.add("model.embed_tokens.weight")
        if last:
            expected |= {"model.norm.weight"} if tie else {"model.norm.weight", "lm_head.weight"}
        assert sorted(read) == sorted(expected), (rank, sorted(set(read) ^ expected))
        assert len(read) == len(set(read))
        # KV only for its own layers.
        runner.initialize_cache(4, 16)
        assert [layer.layer_idx for layer in runner.kv_cache.layers] == list(range(start, end))


def test_layer_partition_is_validated(checkpoint):
    path = checkpoint("llama_names_False", num_layers=3)
    with pytest.raises(ValueError, match="has 3 entries but pipeline_parallel_size is 2"):
        WorkerConfig(model=str(path), pipeline_parallel_size=2, pp_layer_partition="1,1,1")
    for bad in ("2,0", "a,b", "1,,2", "-1,4"):
        with pytest.raises(ValueError, match="comma-separated positive layer counts"):
            WorkerConfig(model=str(path), pipeline_parallel_size=2, pp_layer_partition=bad)
    with pytest.raises(ValueError, match=r"1,1 gives 2 ranks 2 layers, but the model has 3"):
        load_model(
            WorkerConfig(model=str(path), pipeline_parallel_size=2, pp_layer_partition="1,1")
        )
    loaded = load_model(
        WorkerConfig(model=str(path), rank=1, pipeline_parallel_size=2, pp_layer_partition="1,2")
    )
    assert (loaded.start_layer, loaded.end_layer) == (1, 3)


def test_ranks_need_a_rendezvous():
    config = WorkerConfig(model="m", pipeline_parallel_size=2)
    with pytest.raises(
        ValueError, match="--distributed-init-method tcp://HOST:PORT or --master-port"
    ):
        config.init_method()
    assert WorkerConfig(model="m", master_port=1234).init_method() == "tcp://127.0.0.1:1234"
    with pytest.raises(ValueError, match="must be a URL"):
        WorkerConfig(model="m", distributed_init_method="localhost:1")


def test_launcher_gives_each_rank_its_own_gpu(monkeypatch):
    from splitserve.entrypoints.launcher import _gpu_per_rank

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    two = WorkerConfig(model="m", pipeline_parallel_size=2)
    assert _gpu_per_rank(two) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert _gpu_per_rank(two) == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    assert _gpu_per_rank(WorkerConfig(model="m", pipeline_parallel_size=2, device="cpu")) is None
    with pytest.raises(ValueError, match="needs one GPU per worker .3., but 2 are visible"):
        _gpu_per_rank(WorkerConfig(model="m", pipeline_parallel_size=3))
    # Tensor-parallel ranks each get their own GPU too, in global rank order.
    tp = WorkerConfig(model="m", tensor_parallel_size=2)
    assert _gpu_per_rank(tp) == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    with pytest.raises(ValueError, match="--tensor-parallel-size 2 needs one GPU per worker"):
        _gpu_per_rank(WorkerConfig(model="m", pipeline_parallel_size=2, tensor_parallel_size=2))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _gpu_per_rank(two) is None


def test_a_rank_refuses_activations_laid_out_differently(checkpoint):
    from splitserve.worker.pipeline import IntermediateTensors

    path = checkpoint("llama_names_False", num_layers=3)
    ranks = [
        ModelRunner(WorkerConfig(model=str(path), rank=r, pipeline_parallel_size=2))
        for r in range(2)
    ]
    for r in ranks:
        r.initialize_cache(8, 4)
    sp = msg.SamplingParams(temperature=0)
    step = msg.StepRequest(
        step_id=0,
        new_requests=[
            msg.NewRequest(
                request_id=rid,
                token_ids=[5, 6, 7],
                block_ids=[i],
                num_prompt_tokens=3,
                sampling_params=sp,
            )
            for i, rid in enumerate(["a", "b"])
        ],
        num_scheduled_tokens={"a": 3, "b": 3},
    )
    out = ranks[0].execute(step)
    good = IntermediateTensors(out.hidden_states, out.residual, ranks[0].last_layout)
    swapped = IntermediateTensors(out.hidden_states, out.residual, ranks[0].last_layout + 1)
    with pytest.raises(RuntimeError, match="laid out the batch's rows differently"):
        ranks[1].execute(step, swapped)
    fresh = ModelRunner(WorkerConfig(model=str(path), rank=1, pipeline_parallel_size=2))
    fresh.initialize_cache(8, 4)
    assert list(fresh.execute(step, good).request_ids) == ["a", "b"]
    with pytest.raises(RuntimeError, match="plans 0 tokens but the previous pipeline rank sent 6"):
        fresh.execute(msg.StepRequest(step_id=1), good)


def test_layer_partition_from_vllm_environment_variable(checkpoint, monkeypatch):
    path = checkpoint("llama_names_False", num_layers=3)
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "1,2")
    cfg = WorkerConfig(model=str(path), pipeline_parallel_size=2)
    assert cfg.layer_partition() == [1, 2]
    # The flag wins over the environment.
    cfg = WorkerConfig(model=str(path), pipeline_parallel_size=2, pp_layer_partition="2,1")
    assert cfg.layer_partition() == [2, 1]
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "1,1,1")
    with pytest.raises(ValueError, match="has 3 entries"):
        WorkerConfig(model=str(path), pipeline_parallel_size=2)


class _ChainedRanks:
    """Pipeline ranks in one process, for StepDriver: a step goes through each rank in turn,
    activations handed on as the stage transfer would, and the non-last ranks are told the
    sampled tokens afterwards."""

    def __init__(self, ranks: list[ModelRunner]) -> None:
        self.ranks = ranks

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        for rank in self.ranks:
            rank.initialize_cache(num_blocks, block_size)

    def execute(self, step):
        from splitserve.worker.pipeline import IntermediateTensors

        out = None
        for rank in self.ranks:
            out = rank.execute(step, out)
            if isinstance(out, IntermediateTensors):
                out = IntermediateTensors(out.hidden_states, out.residual, rank.last_layout)
        for rank in self.ranks[:-1]:
            rank.record_sampled(list(out.request_ids), list(out.token_ids))
        return out


@pytest.mark.parametrize(
    "arch,config",
    [
        ("qwen3", dict(head_dim=16, tie=True)),
        ("mixtral", dict(num_local_experts=6, num_experts_per_tok=2)),
        ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1])),
    ],
)
def test_newer_architectures_split_over_ranks_match_transformers(checkpoint, arch, config):
    """Two ranks in one process (layers [0, 2) and [2, 3)) decode the workload like
    transformers; for Qwen3-MoE rank 0 holds a sparse and the dense layer."""
    path = checkpoint(f"{arch}_pp", arch=arch, num_layers=3, **config)
    workload = _workload(96)[:8]
    ranks = [
        ModelRunner(WorkerConfig(model=str(path), rank=r, pipeline_parallel_size=2))
        for r in range(2)
    ]
    assert [(r.loaded.start_layer, r.loaded.end_layer) for r in ranks] == [(0, 2), (2, 3)]
    driver = StepDriver(_ChainedRanks(ranks), block_size=4, chunk_size=7)
    sp = msg.SamplingParams(temperature=0, ignore_eos=True)
    for i, (prompt, n) in enumerate(workload):
        driver.add(f"r{i}", prompt, n, sp)
    out = driver.run()
    got = {rid: req.outputs for rid, req in out.items()}
    assert got == _transformers_greedy(path, workload)


@pytest.fixture(scope="module")
def llama_pipelines(checkpoint, tmp_path_factory):
    """P=2 (layers 1 | 2) and P=3 pipelines of one Llama, shared: the idle test, then the
    match test, which stops P=2's last rank (it takes that pipeline)."""
    path = checkpoint("llama_pp", num_layers=3, tie=True)
    partition = ["--pp-layer-partition", "1,2"]
    shared = {
        pp: SharedGrid(
            lambda pp=pp, extra=extra: PipelineWorkers(
                path, pp, tmp_path_factory.mktemp(f"pp{pp}"), TRANSFER_TIMEOUT_S, extra
            )
        )
        for pp, extra in ((2, partition), (3, []))
    }
    yield shared
    for pipeline in shared.values():
        pipeline.close()


def _bursts_with_finishes_and_aborts(engine: EngineCore, vocab: int, rounds: int) -> int:
    """Bursts of requests of mixed lengths, some aborted while their steps are in flight;
    returns how many requests ran to their length."""
    rng = random.Random(11)
    completed = 0
    for burst in range(rounds):
        ids = []
        for i in range(rng.randint(4, 12)):
            rid = f"b{burst}-{i}"
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]
            sp = msg.SamplingParams(max_tokens=rng.randint(1, 10), temperature=0, ignore_eos=True)
            engine.scheduler.add_request(
                msg.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=sp)
            )
            ids.append(rid)
        steps = 0
        while engine.has_work:
            for o in engine.step():
                assert not o.error, o.error
                completed += bool(
                    o.finished and o.finish_reason != common_pb2.FinishReason.FINISH_REASON_ABORT
                )
            steps += 1
            if steps in (1, 3):  # abort while this burst's steps are in the pipeline
                for rid in rng.sample(ids, 2):
                    engine.scheduler.abort_request(rid)
    return completed


def test_an_idle_pipeline_outlives_its_transfer_timeout(llama_pipelines):
    """Bursts with finishes and aborts landing on in-flight micro-batches, then the stack
    idles past --distributed-timeout-seconds: every rank must still be alive and answer.
    (A gloo send reads as not completed until it is waited on, so a rank that only polled its
    sends kept the last burst's as "untaken" and failed an idle stack after the timeout.)"""
    from splitserve.scheduler.executor_grpc import GrpcExecutor

    # Both start at once: their processes load together.
    pipelines = {pp: shared.get() for pp, shared in llama_pipelines.items()}
    for pp, workers in pipelines.items():
        try:
            engine = EngineCore(_config(), GrpcExecutor(workers.addresses, STARTUP_S))
        except Exception:
            raise AssertionError(workers.tail()) from None
        try:
            assert _bursts_with_finishes_and_aborts(engine, 96, rounds=6) > 0
            # Idle: rank 0's check runs every max(0.5, timeout / 4) seconds.
            time.sleep(TRANSFER_TIMEOUT_S * 2 + 1.5)
            dead = [r for r, p in enumerate(workers.procs) if p.poll() is not None]
            assert not dead, f"P={pp}: ranks {dead} exited while idle\n{workers.tail()}"
            out = _generate(engine, [([5, 6, 7], 4), ([8, 9], 3)])
            assert [len(v) for v in out.values()] == [4, 3]
            stats = workers.stage_stats()
            assert len({s.num_steps for s in stats}) == 1, stats
        finally:
            engine.shutdown()


def test_pipeline_ranks_match_one_rank_and_transformers(checkpoint, llama_pipelines):
    """Last in this file: it stops P=2's last rank, breaking the pipeline the idle test
    shared."""
    from splitserve.offline.inproc_executor import InprocExecutor
    from splitserve.scheduler.executor_grpc import GrpcExecutor

    path = checkpoint("llama_pp", num_layers=3, tie=True)
    workload = _workload(96)
    # Both pipelines start at once (unless the idle test left them running): their processes
    # load while this one works. P=2 (layers 1 | 2) ends stopped: this test takes it.
    pipelines = {2: llama_pipelines[2].take(), 3: llama_pipelines[3].get()}
    try:
        single = EngineCore(
            _config(),
            InprocExecutor(ModelRunner(WorkerConfig(model=str(path), kv_cache_memory=1 << 20))),
        )
        one = _generate(single, workload)
        single.shutdown()
        assert one == _transformers_greedy(path, workload)
        for pp, workers in pipelines.items():
            try:
                engine = EngineCore(_config(), GrpcExecutor(workers.addresses, STARTUP_S))
            except Exception:
                raise AssertionError(workers.tail()) from None
            assert engine.pipeline_parallel_size == pp and engine.max_inflight == pp
            # Rank r gives P - r MiB to its own layers only (2 KiB per layer and block):
            # the last rank has the fewest blocks, and they bound the scheduler's.
            last_layers = 2 if pp == 2 else 1
            assert engine.num_blocks == (1 << 20) // (last_layers * 2048)
            got = _generate(engine, workload)
            stats = workers.stage_stats()
            assert got == one, f"P={pp} differs from one rank"
            steps = {s.num_steps for s in stats}
            assert len(steps) == 1 and steps.pop() > 0, stats  # every rank ran every step
            assert stats[0].recv_wait_seconds == 0 and stats[-1].send_wait_seconds == 0
            if pp == 2:
                _last_rank_stuck_fails_the_engine(engine, workers)
            engine.shutdown()
    finally:
        pipelines[2].kill()


def _last_rank_stuck_fails_the_engine(engine: EngineCore, workers: PipelineWorkers) -> None:
    """A stopped (not dead) last rank: rank 0 sees its activations untaken past the timeout
    and fails, and the scheduler's executor turns that into WorkerDied instead of waiting."""
    from splitserve.scheduler.executor_grpc import WorkerDied

    os.kill(workers.procs[-1].pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(WorkerDied, match="rank 1 has not taken rank 0's activations"):
        _generate(engine, [([5, 6, 7], 4), ([8, 9], 4)])
    assert time.monotonic() - start < TRANSFER_TIMEOUT_S + 20
