"""A hybrid Bamba checkpoint (mixer, attention, mixer) split over two `splitserve worker`
processes: rank 0 holds a mixer and the attention layer, rank 1 a mixer. Each rank reports its
own layers' cache specs and keeps its own state slots; the scheduler plans both kinds over the
two. Greedy tokens equal one in-process rank and transformers, with prefix-cache hits
restoring the state snapshots on both ranks."""

from __future__ import annotations

import random

import torch

from splitserve.offline.inproc_executor import InprocExecutor
from splitserve.scheduler.engine_core import EngineCore
from splitserve.scheduler.executor_grpc import GrpcExecutor
from splitserve.testing.mamba2_model import build_bamba
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_runner import ModelRunner

from ..models.utils import hf_greedy_logprobs, hf_model
from .test_pipeline_parallel import STARTUP_S, PipelineWorkers, _config, _generate


def test_hybrid_split_over_two_ranks_matches(tmp_path):
    path = build_bamba(tmp_path / "bamba", attn_layer_indices=(1,))
    rng = random.Random(3)
    workload = [([rng.randrange(5, 900) for _ in range(rng.randint(20, 90))], 6) for _ in range(5)]
    workload.append((list(workload[0][0]), 6))  # the same prompt again: a prefix-cache hit
    workers = PipelineWorkers(path, 2, tmp_path, 60, ["--pp-layer-partition", "2,1"])
    try:
        single = EngineCore(
            _config(),
            InprocExecutor(ModelRunner(WorkerConfig(model=str(path), kv_cache_memory=1 << 20))),
        )
        one = _generate(single, workload)
        single.shutdown()
        hf = hf_greedy_logprobs(hf_model(path, torch.float32), [p for p, _ in workload], 6, 1)
        assert one == {f"r{i}": tokens for i, (tokens, _) in enumerate(hf)}
        try:
            engine = EngineCore(_config(), GrpcExecutor(workers.addresses, STARTUP_S))
        except Exception:
            raise AssertionError(workers.tail()) from None
        assert engine.pipeline_parallel_size == 2 and engine.num_state_slots > 0
        got = _generate(engine, workload[:5])
        got.update(_generate_one(engine, "r5", workload[5][0]))
        assert got == one
        assert engine.scheduler.kv.state.num_snapshots_taken > 0
        engine.shutdown()
    finally:
        workers.kill()


def _generate_one(engine: EngineCore, rid: str, prompt: list[int]) -> dict[str, list[int]]:
    """After the others finished: its prompt's snapshot is visible, so it starts from it."""
    from splitserve.common import messages as msg

    sp = msg.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.scheduler.add_request(
        msg.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=sp)
    )
    out: list[int] = []
    cached = 0
    while engine.has_work:
        for o in engine.step():
            assert not o.error, o.error
            out.extend(o.token_ids)
            cached = o.num_cached_tokens
    assert cached > 0, "the repeated prompt did not hit the prefix cache"
    return {rid: out}
