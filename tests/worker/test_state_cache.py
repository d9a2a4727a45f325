"""The worker side of the cache seam for a Mamba2 checkpoint: Describe reports one recurrent
spec per layer whose bytes match the state tensors it allocates; requests must carry a slot in
range and start from cached tokens only with a snapshot to restore; a state written in one step is read by the next."""

from __future__ import annotations

import pytest
import torch

from splitserve.common import messages as msg
from splitserve.protos import worker_pb2
from splitserve.testing.mamba2_model import build_mamba2
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_runner import ModelRunner

Kind = worker_pb2.LayerCacheSpec.Kind


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = build_mamba2(tmp_path_factory.mktemp("ssm") / "m", num_layers=2)
    r = ModelRunner(WorkerConfig(model=str(path), max_model_len=256, kv_cache_memory=1 << 20))
    return r


def test_describe_reports_recurrent_specs_and_slots_are_allocated(runner):
    d = runner.describe(16)
    assert [s.kind for s in d.cache_specs] == [Kind.KIND_RECURRENT_STATE] * 2
    spec = d.cache_specs[0]
    # conv over x, B and C (128 + 2 * 2 * 16) with kernel 4; SSM state 8 heads x 16 x 16.
    assert list(spec.conv_state_shape) == [192, 3]
    assert list(spec.ssm_state_shape) == [8, 16, 16]
    assert spec.dtype == "float32"
    assert d.bytes_per_block == 0
    runner.initialize_cache(8, 16, 3)
    assert runner.state_cache.num_slots == 3
    assert runner.state_cache.nbytes == 3 * sum(s.page_bytes for s in d.cache_specs)
    assert runner.describe(16).available_kv_bytes == runner.state_cache.nbytes
    with pytest.raises(ValueError, match="num_state_slots must be positive"):
        runner.initialize_cache(8, 16, 0)
    runner.initialize_cache(8, 16, 3)


def _new(rid, tokens, slot, computed=0):
    return msg.NewRequest(
        request_id=rid,
        token_ids=tokens,
        sampling_params=msg.SamplingParams(temperature=0, logprobs=3),
        block_ids=[0, 1],
        num_computed_tokens=computed,
        num_prompt_tokens=len(tokens),
        state_slot=slot,
    )


def test_requests_without_a_valid_slot_or_snapshot_fail(runner):
    runner.initialize_cache(8, 16, 3)
    step = msg.StepRequest(
        step_id=1,
        new_requests=[
            _new("noslot", [5, 6, 7], -1),
            _new("far", [5, 6, 7], 3),
            _new("hit", [5, 6, 7, 8], 0, computed=2),
        ],
        num_scheduled_tokens={"noslot": 3, "far": 3, "hit": 2},
    )
    result = runner.execute(step)
    assert "state_slot -1 is outside [0, 3)" in result.errors["noslot"]
    assert "state_slot 3 is outside [0, 3)" in result.errors["far"]
    assert "only with a state snapshot (restore_state_slot -1)" in result.errors["hit"]


def test_chunks_read_the_state_the_previous_chunk_wrote(runner):
    """The same prompt in one step and in three chunks gives the same next-token logprobs; with
    the slot zeroed between chunks it does not."""
    runner.initialize_cache(8, 16, 3)
    prompt = list(range(40, 70))

    def run(chunks, clobber=False):
        rid = f"r{len(chunks)}{clobber}"
        step = msg.StepRequest(
            step_id=1, new_requests=[_new(rid, prompt, 2)], num_scheduled_tokens={rid: chunks[0]}
        )
        result = runner.execute(step)
        done = chunks[0]
        for n in chunks[1:]:
            if clobber:
                for conv, ssm in runner.state_cache.caches:
                    conv[2].zero_()
                    ssm[2].zero_()
            result = runner.execute(
                msg.StepRequest(
                    step_id=2,
                    cached_requests=[msg.CachedRequest(rid, [], done)],
                    num_scheduled_tokens={rid: n},
                )
            )
            done += n
        runner.execute(msg.StepRequest(step_id=3, finished_request_ids=[rid]))
        return torch.tensor(result.logprobs[0].top_logprobs)

    whole = run([30])
    torch.testing.assert_close(run([11, 9, 10]), whole, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(run([11, 9, 10], clobber=True), whole, atol=1e-3)
