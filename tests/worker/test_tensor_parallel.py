"""Tensor parallelism: P x T `splitserve worker` processes over gloo, each stage's driver driven
by the real scheduler over gRPC, against one rank and against transformers; a dead rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from splitserve.entrypoints.launcher import free_port
from splitserve.scheduler.engine_core import EngineCore
from splitserve.worker.config import WorkerConfig
from splitserve.worker.linear import local_heads
from splitserve.worker.model_runner import ModelRunner

from .test_pipeline_parallel import _config, _generate, _transformers_greedy, _workload
from .utils import SharedGrid

STARTUP_S = 180.0


class GridWorkers:
    """`splitserve worker` processes, P stages x T tensor-parallel ranks, one rendezvous."""

    def __init__(
        self, model, pp: int, tp: int, log_dir, timeout_s: float, kv=None, extra=()
    ) -> None:
        init = f"tcp://127.0.0.1:{free_port()}"
        self.cells = [(r, k) for r in range(pp) for k in range(tp)]
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in self.cells]
        tag = "-ep" if extra else ""
        self.logs = [log_dir / f"pp{pp}tp{tp}{tag}-{r}-{k}.log" for r, k in self.cells]
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
                    str(r),
                    "--tp-rank",
                    str(k),
                    "--pipeline-parallel-size",
                    str(pp),
                    "--tensor-parallel-size",
                    str(tp),
                    "--distributed-init-method",
                    init,
                    "--distributed-timeout-seconds",
                    str(timeout_s),
                    "--kv-cache-memory",
                    (kv or {}).get((r, k), "1MiB"),
                    *extra,
                ],
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            for (r, k), addr, log in zip(self.cells, self.addresses, self.logs, strict=True)
        ]
        self.drivers = [a for (_, k), a in zip(self.cells, self.addresses, strict=True) if k == 0]

    def engine(self) -> EngineCore:
        from splitserve.scheduler.executor_grpc import GrpcExecutor

        try:
            return EngineCore(_config(), GrpcExecutor(self.drivers, STARTUP_S, step_timeout_s=60))
        except Exception:
            raise AssertionError(self.tail()) from None

    def generate(self, workload) -> dict[str, list[int]]:
        """Greedy tokens of `workload` through an engine over this grid (shut down after)."""
        engine = self.engine()
        try:
            return _generate(engine, workload)
        finally:
            engine.shutdown()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)


def spy_reads(monkeypatch, *methods: str) -> list[str]:
    """Names of the checkpoint tensors read from here on through LazyTensor's `methods`
    ("materialize": read whole; "narrow": a slice), in order."""
    from splitserve.worker.checkpoint_slices import LazyTensor

    reads: list[str] = []
    for method in methods:
        original = getattr(LazyTensor, method)

        def spy(self, *args, _original=original):
            reads.append(self.name)
            return _original(self, *args)

        monkeypatch.setattr(LazyTensor, method, spy)
    return reads


def check_tp_and_ep(folder, oracle_folder, workload, log_dir, label: str) -> None:
    """TP=2 and EP=2 grids of a 4-expert MoE checkpoint give one rank's greedy tokens, which are
    transformers' on `oracle_folder` (the checkpoint dequantized, for a quantized one)."""
    modes = {"tp": (), "ep": ("--enable-expert-parallel",)}
    for mode in modes:
        (log_dir / mode).mkdir()
    grids = {m: GridWorkers(folder, 1, 2, log_dir / m, 60, extra=e) for m, e in modes.items()}
    try:
        one = _one_rank(folder, workload)
        assert one == _transformers_greedy(oracle_folder, workload)
        for mode, grid in grids.items():
            got = grid.generate(workload)
            assert got == one, f"{label}: {mode.upper()}=2 differs from one rank"
        assert "experts [2, 4) of 4 in every MoE layer" in grids["ep"].logs[1].read_text()
    finally:
        for grid in grids.values():
            grid.kill()


def _one_rank(path, workload) -> dict[str, list[int]]:
    from splitserve.offline.inproc_executor import InprocExecutor

    single = EngineCore(
        _config(),
        InprocExecutor(ModelRunner(WorkerConfig(model=str(path), kv_cache_memory=1 << 20))),
    )
    try:
        return _generate(single, workload)
    finally:
        single.shutdown()


def test_heads_split_and_kv_heads_replicate():
    # 8 query heads, 4 KV heads over 2 ranks: both split.
    assert local_heads(8, 4, 1, 2) == ((4, 4), (2, 2))
    # 2 KV heads over 4 ranks: each KV head held by the 2 ranks whose query heads read it.
    assert [local_heads(8, 2, r, 4)[1] for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="num_attention_heads .6. is not divisible"):
        local_heads(6, 2, 0, 4)
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        local_heads(12, 2, 0, 3)


def test_architectures_without_tensor_parallelism_are_refused(checkpoint):
    from splitserve.worker.model_loader import check_tensor_parallel
    from splitserve.worker.models.mamba2 import Mamba2ForCausalLM

    with pytest.raises(ValueError, match="Mamba2ForCausalLM does not support tensor parallel"):
        check_tensor_parallel(Mamba2ForCausalLM, ["Mamba2ForCausalLM"], 2)
    check_tensor_parallel(Mamba2ForCausalLM, ["Mamba2ForCausalLM"], 1)  # TP=1: as before


def test_preflight_refuses_what_cannot_be_sharded(checkpoint, monkeypatch):
    from splitserve.worker.model_loader import check_model
    from splitserve.worker.models.llama import LlamaForCausalLM

    path = str(_llama_checkpoint(checkpoint))
    check_model(WorkerConfig(model=path, tensor_parallel_size=2))  # shards fine
    with pytest.raises(ValueError, match="num_attention_heads .4. is not divisible by .* 3"):
        check_model(WorkerConfig(model=path, tensor_parallel_size=3))
    with pytest.raises(ValueError, match="Fp8OnlineLinearMethod cannot load one rank's slice"):
        check_model(WorkerConfig(model=path, tensor_parallel_size=2, quantization="fp8"))
    monkeypatch.setattr(LlamaForCausalLM, "supports_tensor_parallel", False)
    with pytest.raises(ValueError, match="LlamaForCausalLM does not support tensor parallel"):
        check_model(WorkerConfig(model=path, tensor_parallel_size=2))
    check_model(WorkerConfig(model=path))


def test_each_rank_reads_only_its_slices(checkpoint, monkeypatch):
    """Rank 1 of 2 of Qwen3-MoE (one KV head, replicated): every sharded tensor is read through
    a narrowed safetensors slice, only replicated ones whole, and each parameter holds exactly
    its rows / columns of the checkpoint."""
    from safetensors.torch import load_file

    from splitserve.worker.model_loader import load_model

    path = _moe_checkpoint(checkpoint)
    whole_reads = spy_reads(monkeypatch, "materialize")
    model = load_model(
        WorkerConfig(model=str(path), tensor_parallel_size=2, tp_rank=1, max_model_len=64)
    ).model
    assert whole_reads and all(
        n.endswith(("norm.weight", "mlp.gate.weight")) for n in whole_reads
    ), whole_reads
    ckpt = load_file(str(path / "model.safetensors"))
    params = model.state_dict()  # checkpoint-form tensors (not oneDNN-packed)
    attn, moe, dense = "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.mlp"
    d = 8  # head_dim: 4 query heads -> 2 on rank 1 (heads 2, 3); the one KV head on both
    q, k, v = (ckpt[f"{attn}.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(params[f"{attn}.qkv_proj.weight"], torch.cat([q[2 * d :], k, v]))
    assert torch.equal(params[f"{attn}.o_proj.weight"], ckpt[f"{attn}.o_proj.weight"][:, 2 * d :])
    gate, up = (ckpt[f"{dense}.{p}_proj.weight"] for p in ("gate", "up"))
    assert torch.equal(params[f"{dense}.gate_up_proj.weight"], torch.cat([gate[32:], up[32:]]))
    e3 = f"{moe}.experts.3"
    stack = params[f"{moe}.experts.gate_up_proj"][3]  # moe_intermediate_size 32 -> 16 a rank
    assert torch.equal(stack[:16], ckpt[f"{e3}.gate_proj.weight"][16:])
    assert torch.equal(stack[16:], ckpt[f"{e3}.up_proj.weight"][16:])
    down = params[f"{moe}.experts.down_proj"][3]
    assert torch.equal(down, ckpt[f"{e3}.down_proj.weight"][:, 16:])
    vocab = ckpt["model.embed_tokens.weight"]  # 96 rows -> rows 48..95 on rank 1
    assert torch.equal(params["model.embed_tokens.weight"], vocab[48:])
    assert torch.equal(params["lm_head.weight"], ckpt["lm_head.weight"][48:])


def _llama_checkpoint(checkpoint):
    # NOTE: 99 rows do not split evenly: rank 1's vocabulary chunk ends in a zero pad row.
    return checkpoint("llama_tp", num_layers=2, tie=True, vocab_size=99)


def _moe_checkpoint(checkpoint):
    return checkpoint(
        "qwen3_moe_tp",
        arch="qwen3_moe",
        num_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        mlp_only_layers=[1],
        num_key_value_heads=1,  # fewer KV heads than ranks: each rank holds a copy
    )


IDLE_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def llama_grid(checkpoint, tmp_path_factory):
    """Llama TP=2, distributed timeout 10 s, its peer giving less KV memory than its driver:
    shared by the tests that leave it working, taken last by the stuck-rank test."""
    path = _llama_checkpoint(checkpoint)
    shared = SharedGrid(
        lambda: GridWorkers(
            path, 1, 2, tmp_path_factory.mktemp("tp_llama"), 10, kv={(0, 1): "512KiB"}
        )
    )
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def idle_llama_grid(checkpoint, tmp_path_factory):
    """Llama TP=2 with a short distributed timeout: the idle-stage test, then the dead-rank
    test takes it."""
    path = _llama_checkpoint(checkpoint)
    shared = SharedGrid(
        lambda: GridWorkers(path, 1, 2, tmp_path_factory.mktemp("tp_idle"), IDLE_TIMEOUT_S)
    )
    yield shared
    shared.close()


def test_tp2_matches_one_rank_and_transformers(checkpoint, tmp_path, llama_grid):
    paths = {
        "llama": _llama_checkpoint(checkpoint),
        "moe": _moe_checkpoint(checkpoint),
        # Experts under block_sparse_moe, renamed while loading, each sharded over the ranks.
        "mixtral": checkpoint(
            "mixtral_tp", arch="mixtral", num_layers=2, num_local_experts=4, num_experts_per_tok=2
        ),
        "qwen2": checkpoint("qwen2_tp", arch="qwen2", num_layers=2),  # q/k/v biases sliced too
    }
    workload = _workload(96)[:12]
    own = [name for name in paths if name != "llama"]
    for name in own:
        (tmp_path / name).mkdir()
    grids = {name: GridWorkers(paths[name], 1, 2, tmp_path / name, 60) for name in own}
    # The shared Llama grid's peer gives less KV memory than its driver: the stage reports
    # the least.
    grids["llama"] = llama_grid.get()
    try:
        for name, path in paths.items():
            one = _one_rank(path, workload)
            assert one == _transformers_greedy(path, workload)
            engine = grids[name].engine()
            if name == "llama":
                # Per rank 1 KV head of 8 dims: K and V of 16 tokens in fp32 over 2 layers.
                assert engine.num_blocks == (512 << 10) // (2 * 2 * 16 * 8 * 4)
            got = _generate(engine, workload)
            engine.shutdown()
            assert got == one, f"{name}: TP=2 differs from one rank"
    finally:
        for name in own:
            grids[name].kill()


@pytest.mark.parametrize("model", ["llama", "qwen3_moe-ep-eplb"])
def test_pp2_by_tp2_matches_transformers(checkpoint, tmp_path, model):
    if model == "llama":
        path, extra = checkpoint("llama_tp_pp", num_layers=3), []
    else:  # experts partitioned over each stage's two ranks (stage 1 is global ranks 2, 3)
        path = checkpoint(
            "qwen3_moe_tp_pp",
            arch="qwen3_moe",
            num_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        )
        # and rebalanced every 2 steps (each stage its own layer), weights crossing ranks.
        eplb = '{"window_size": 2, "step_interval": 2, "num_redundant_experts": 2}'
        extra = ["--enable-expert-parallel", "--enable-eplb", "--eplb-config", eplb]
    workload = _workload(96)[:10]
    grid = GridWorkers(path, 2, 2, tmp_path, 60, extra=extra)
    try:
        engine = grid.engine()
        assert engine.pipeline_parallel_size == 2
        got = _generate(engine, workload)
        engine.shutdown()
        assert got == _transformers_greedy(path, workload)
        if extra:  # stage 1's second rank starts with slots 3..5: experts 3, 0, 1
            assert "slots [3, 6) of 6" in grid.logs[3].read_text()
            assert engine.eplb_report is not None and engine.eplb_report.num_rebalances > 0
            for log in grid.logs:  # every rank of both stages rebalanced its own layer
                assert "EPLB rebalance 1:" in log.read_text(), grid.tail()
    finally:
        grid.kill()


def test_expert_parallel_reads_only_local_experts(checkpoint, monkeypatch):
    from splitserve.worker.model_loader import load_model

    path = _moe_checkpoint(checkpoint)
    read = spy_reads(monkeypatch, "materialize", "narrow")
    config = WorkerConfig(
        model=str(path), tensor_parallel_size=2, tp_rank=1, enable_expert_parallel=True
    )
    experts = load_model(config).model.model.layers[0].mlp.experts
    assert (experts.first_expert, experts.num_local_experts) == (2, 2)
    assert experts.gate_up_proj.shape[0] == 2 and experts.intermediate_size == 32  # whole
    read_experts = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert read_experts == {2, 3}
    with pytest.raises(ValueError, match="needs --tensor-parallel-size > 1"):
        WorkerConfig(model=str(path), enable_expert_parallel=True)


def test_ep2_qwen3_moe_matches_one_rank(checkpoint, tmp_path):
    path = _moe_checkpoint(checkpoint)
    workload = _workload(96)[:12]
    grid = GridWorkers(path, 1, 2, tmp_path, 60, extra=["--enable-expert-parallel"])
    try:
        one = _one_rank(path, workload)
        got = grid.generate(workload)
        assert got == one
        assert "experts [2, 4) of 4 in every MoE layer" in grid.logs[1].read_text()
    finally:
        grid.kill()


def test_an_idle_stage_outlives_its_distributed_timeout(idle_llama_grid):
    """Peers wait for their driver's next command for at most the distributed timeout; the
    driver's heartbeats keep an idle stage alive past it (this is the idle time under test,
    not a synchronisation)."""
    grid = idle_llama_grid.get()
    engine = grid.engine()
    try:
        assert [len(v) for v in _generate(engine, [([5, 6, 7], 4)]).values()] == [4]
        time.sleep(IDLE_TIMEOUT_S * 2 + 1.5)
        dead = [i for i, p in enumerate(grid.procs) if p.poll() is not None]
        assert not dead, grid.tail()
        out = _generate(engine, [([5, 6, 7], 4), ([8, 9], 3)])
        assert {rid: len(v) for rid, v in out.items()} == {"r0": 4, "r1": 3}
    finally:
        engine.shutdown()


def test_a_constraint_only_the_driver_refuses_fails_that_request_only(checkpoint, llama_grid):
    """Grammar matchers live on the last stage's driver: a constraint it refuses drops the
    request there, and its peers must drop it too (or the ranks plan different rows and
    their collectives no longer match); the other requests finish as on one rank."""
    from splitserve.common import messages as msg

    path = _llama_checkpoint(checkpoint)
    workload = _workload(96)[:3]
    one = _one_rank(path, workload)
    engine = llama_grid.get().engine()
    try:
        sp = msg.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        bad = msg.GenerateRequest(request_id="bad", prompt_token_ids=[5, 6, 7], sampling_params=sp)
        engine.scheduler.add_request(bad, msg.GrammarSpec(kind="no-such-kind", spec="x"))
        for i, (prompt, n) in enumerate(workload):
            sp = msg.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            engine.scheduler.add_request(
                msg.GenerateRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling_params=sp)
            )
        got: dict[str, list[int]] = {}
        errors: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while engine.has_work:
            assert time.monotonic() < deadline, "generation did not finish"
            for o in engine.step():
                if o.error:
                    errors[o.request_id] = o.error
                else:
                    got.setdefault(o.request_id, []).extend(o.token_ids)
        assert list(errors) == ["bad"] and "no-such-kind" in errors["bad"], errors
        assert got == one
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "sig, shared",
    [(signal.SIGKILL, "idle_llama_grid"), (signal.SIGSTOP, "llama_grid")],
    ids=["killed", "stopped"],
)
def test_a_dead_or_stuck_tensor_parallel_rank_fails_the_stream(request, sig, shared):
    """CHECKLIST rows 22 / 28: a peer dies (or stalls) mid-stream; the driver's collective
    fails (at once, or after the distributed timeout, 10 s), the scheduler's executor raises
    instead of waiting, and the driver reports itself dead. Last in this file: each case takes
    (and breaks) a grid the tests above shared."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from splitserve.common import messages as msg
    from splitserve.scheduler.executor_grpc import WorkerDied

    grid = request.getfixturevalue(shared).take()
    try:
        engine = grid.engine()
        for i in range(4):
            sp = msg.SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            engine.scheduler.add_request(
                msg.GenerateRequest(
                    request_id=f"k{i}", prompt_token_ids=[5, 6, 7], sampling_params=sp
                )
            )
        for _ in range(3):
            for out in engine.step():
                assert not out.error
        os.kill(grid.procs[1].pid, sig)
        start = time.monotonic()
        with pytest.raises(WorkerDied):
            while engine.has_work:
                engine.step()
        assert time.monotonic() - start < 60
        with grpc.insecure_channel(grid.drivers[0]) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        engine.shutdown()
    finally:
        grid.kill()
