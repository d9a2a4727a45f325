"""EPLB over expert-parallel ranks, through the real scheduler and `splitserve worker`
processes (gloo): the scheduler marks every step_interval-th step, both ranks re-place their
experts at that boundary, weights cross between them, and the greedy tokens stay those of one
rank without EPLB (and of transformers)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from splitserve.worker.config import WorkerConfig
from splitserve.worker.eplb import EplbConfig, parse_eplb_config

from .test_pipeline_parallel import _generate, _transformers_greedy, _workload
from .test_tensor_parallel import GridWorkers, _moe_checkpoint, _one_rank

EPLB = {"window_size": 4, "step_interval": 3, "num_redundant_experts": 2, "log_balancedness": True}
REBALANCE = re.compile(
    r"EPLB rebalance (\d+): balancedness ([\d.]+) -> ([\d.]+), (\d+) layers moved "
    r"\((\d+) copies, (\d+) experts received"
)


def _skewed(path, out):
    """A copy of the tiny Qwen3-MoE whose router sends most tokens to expert 2: every token's
    embedding gets a large constant in feature 0, and the router row of expert 2 reads it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, out)
    weights = load_file(out / "model.safetensors")
    weights["model.embed_tokens.weight"][:, 0] += 6.0
    weights["model.layers.0.mlp.gate.weight"][2, 0] = 3.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def check_eplb_on_skewed(folder, dense_folder, tmp_path) -> None:
    """EP=2 with EPLB over a skewed copy of `folder` (a quantized Qwen3-MoE) with 2 redundant
    slots: both ranks rebalance alike, experts cross between them, and the tokens stay those of
    one rank and of transformers on `dense_folder` (its dequantized form, skewed the same)."""
    folder = _skewed(folder, tmp_path / "skewed")
    dense_folder = _skewed(dense_folder, tmp_path / "skewed-dense")
    workload = _workload(96)[:10]
    eplb = {"window_size": 4, "step_interval": 3, "num_redundant_experts": 2}
    extra = ["--enable-expert-parallel", "--enable-eplb", "--eplb-config", json.dumps(eplb)]
    grid = GridWorkers(folder, 1, 2, tmp_path, 60, extra=extra)
    try:
        one = _one_rank(folder, workload)
        assert one == _transformers_greedy(dense_folder, workload)
        assert grid.generate(workload) == one
        moves = [REBALANCE.findall(log.read_text()) for log in grid.logs]
        assert moves[0] and len(moves[0]) == len(moves[1]), grid.tail()
        assert any(int(m[3]) > 0 for m in moves[0]), "the placement never changed"
        assert any(int(m[5]) > 0 for m in moves[0] + moves[1]), "no expert crossed ranks"
    finally:
        grid.kill()


def test_ep2_with_eplb_moves_experts_and_keeps_the_tokens(checkpoint, tmp_path):
    path = _skewed(_moe_checkpoint(checkpoint), tmp_path / "skewed")
    workload = _workload(96)[:10]
    extra = ["--enable-expert-parallel", "--enable-eplb", "--eplb-config", json.dumps(EPLB)]
    grid = GridWorkers(path, 1, 2, tmp_path, 60, extra=extra)
    try:
        one = _one_rank(path, workload)
        engine = grid.engine()
        assert engine.eplb_step_interval == 3
        got = _generate(engine, workload)
        stats = engine.stats()
        engine.shutdown()
        assert got == one
        assert got == {k: v for k, v in _transformers_greedy(path, workload).items() if k in got}
        logs = [log.read_text() for log in grid.logs]
        # 4 experts + 2 spare slots over 2 ranks: rank 1 starts with experts 3, 0, 1.
        assert (
            "slots [3, 6) of 6 in every MoE layer on this rank, holding experts [3, 0, 1]"
            in (logs[1])
        )
        moves = [[tuple(float(x) for x in m) for m in REBALANCE.findall(text)] for text in logs]
        assert len(moves[0]) >= 3 and len(moves[0]) == len(moves[1]), grid.tail()
        # Both ranks chose the same placements (same balancedness and layers at each one).
        assert [m[:4] for m in moves[0]] == [m[:4] for m in moves[1]]
        assert any(m[3] > 0 for m in moves[0]), "the placement never changed"
        assert sum(m[5] for m in moves[0] + moves[1]) > 0, "no expert crossed ranks"
        assert all(after >= before for _, before, after, *_ in moves[0])
        # The skew: expert 2 alone on rank 0 carries most of the load until it gets a replica.
        _, before, after, *_ = moves[0][0]
        assert before < 0.8 and after > before + 0.1, moves[0]
        assert stats.eplb_num_rebalances == len(moves[0])
        assert stats.eplb_balancedness == pytest.approx(moves[0][-1][2], abs=1e-3)
        assert "EPLB: balancedness" in logs[0]  # log_balancedness: the window, each step
    finally:
        grid.kill()


def test_eplb_flags_are_checked_like_vllm():
    assert parse_eplb_config(json.dumps(EPLB)) == EplbConfig(4, 3, 2, True)
    assert parse_eplb_config('{"use_async": false, "policy": "default"}') == EplbConfig()
    with pytest.raises(ValueError, match="use_async=True is not supported"):
        parse_eplb_config('{"use_async": true}')
    with pytest.raises(ValueError, match="unknown eplb_config key 'windows'"):
        parse_eplb_config('{"windows": 3}')
    with pytest.raises(ValueError, match="window_size must be int"):
        parse_eplb_config('{"window_size": "3"}')
    with pytest.raises(ValueError, match="needs --enable-expert-parallel"):
        WorkerConfig(model="m", tensor_parallel_size=2, enable_eplb=True)
    with pytest.raises(ValueError, match="EPLB is off"):
        WorkerConfig(model="m", eplb_config='{"num_redundant_experts": 2}')
    config = WorkerConfig(
        model="m",
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        enable_eplb=True,
        eplb_config={"step_interval": 5},  # the in-process LLM's dict
    )
    assert config.eplb == EplbConfig(step_interval=5)
    assert WorkerConfig(model="m").eplb is None


def test_too_many_redundant_experts_for_the_ranks_are_refused(checkpoint):
    from splitserve.worker.model_loader import load_model

    path = _moe_checkpoint(checkpoint)
    config = WorkerConfig(
        model=str(path),
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        enable_eplb=True,
        eplb_config={"num_redundant_experts": 6},  # 10 slots: 5 per rank for 4 experts
    )
    with pytest.raises(ValueError, match="a rank would hold an expert twice"):
        load_model(config)
    config.eplb_config = '{"num_redundant_experts": 1}'
    with pytest.raises(ValueError, match=r"plus redundant experts \(5\) is not divisible"):
        load_model(config)
