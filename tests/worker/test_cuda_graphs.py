"""CUDA graphs: sizing, padding and the eager fallback (anywhere, the runner's graph path run
uncaptured on CPU), capture/replay parity with eager decoding (CUDA only)."""

from __future__ import annotations

import os

import pytest
import torch

from splitserve.common import messages as msg
from splitserve.worker import model_runner
from splitserve.worker.config import WorkerConfig
from splitserve.worker.cuda_graphs import (
    CudaGraphRunner,
    capture_sizes,
    padded_batch_size,
    should_run_eager,
)
from splitserve.worker.model_runner import ModelRunner


def test_default_sizes_follow_vllm_pattern():
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(10) == [1, 2, 4, 8, 16]  # rounded up so batch 10 still has a graph
    assert capture_sizes(3) == [1, 2, 4, 8]
    assert capture_sizes(1024) == [1, 2, 4, *range(8, 513, 8)]  # default ceiling 512
    assert capture_sizes(64, max_capture_size=20) == [1, 2, 4, 8, 16]
    assert capture_sizes(64, max_capture_size=0) == []


def test_explicit_sizes():
    assert capture_sizes(256, [32]) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(256, [48, 1, 6, 6]) == [1, 6, 48]
    assert capture_sizes(256, [1, 600], max_capture_size=512) == [1]
    with pytest.raises(ValueError, match="positive"):
        capture_sizes(8, [0, 4])
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(0)


def test_padded_batch_size():
    sizes = [1, 2, 4, 8, 16]
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert padded_batch_size(17, sizes) is None
    assert padded_batch_size(3, []) is None


def test_should_run_eager():
    sizes = [1, 2, 4, 8]
    assert not should_run_eager(3, 100, sizes, 8192, enforce_eager=False)
    assert should_run_eager(3, 100, sizes, 8192, enforce_eager=True)
    assert should_run_eager(9, 100, sizes, 8192, enforce_eager=False)  # beyond largest graph
    assert should_run_eager(3, 8193, sizes, 8192, enforce_eager=False)  # context too long
    assert not should_run_eager(3, 8192, sizes, 8192, enforce_eager=False)
    assert should_run_eager(3, 10, [], 8192, enforce_eager=False)
    assert should_run_eager(0, 10, sizes, 8192, enforce_eager=False)


def test_runner_pads_inputs_without_cuda():
    """Before capture the runner calls fn eagerly on the padded static buffers: the same rows a
    graph would read. Pads use each input's pad value; an input with an offset (like
    cu_seqlens, [B + 1]) is sliced to size + 1."""
    seen = []

    def fn(x, slots, cu):
        seen.append((x.clone(), slots.clone(), cu.clone()))
        return x * 2

    runner = CudaGraphRunner(
        fn,
        [torch.zeros(8, 3), torch.zeros(8, dtype=torch.long), torch.zeros(9, dtype=torch.int32)],
        [1, 2, 4, 8],
        pad_values=[0.0, -1, 5],
    )
    x = torch.randn(3, 3)
    out = runner.run(x, torch.tensor([7, 8, 9]), torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    torch.testing.assert_close(out, x * 2)
    px, pslots, pcu = seen[-1]
    assert px.shape == (4, 3) and torch.equal(px[3], torch.zeros(3))
    assert pslots.tolist() == [7, 8, 9, -1]
    assert pcu.tolist() == [0, 1, 2, 3, 5]
    assert runner.can_run(8) and not runner.can_run(9)
    with pytest.raises(ValueError, match="exceeds"):
        runner.run(torch.randn(9, 3), torch.zeros(9, dtype=torch.long), torch.zeros(10))
    with pytest.raises(ValueError, match="does not fit"):
        runner.run(torch.randn(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(3))
    with pytest.raises(RuntimeError, match="CUDA"):
        runner.capture()  # CPU buffers cannot be captured, with or without a GPU present


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_and_replay_match_eager():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16)
    ).cuda()

    def fn(x):
        return mlp(x)

    sizes = capture_sizes(16)
    runner = CudaGraphRunner(fn, [torch.zeros(max(sizes), 32, device="cuda")], sizes)
    runner.capture()
    assert set(runner.graphs) == set(sizes)
    with torch.inference_mode():
        for n in (1, 3, 8, 13, 16):
            x = torch.randn(n, 32, device="cuda")
            out = runner.run(x).clone()
            torch.testing.assert_close(out, mlp(x), atol=1e-5, rtol=1e-5)


def test_runner_tuple_outputs_and_narrow_inputs_without_cuda():
    """Outputs may be tuples (a pipeline stage's hidden states and residual); an input narrower
    than its buffer past dim 0 (a block table of fewer columns) fills the leading corner."""
    runner = CudaGraphRunner(
        lambda x, table: (x + 1, table.sum(1)),
        [torch.zeros(4, 2), torch.zeros(4, 5, dtype=torch.int32)],
        [2, 4],
    )
    x = torch.ones(3, 2)
    a, b = runner.run(x, torch.ones(3, 2, dtype=torch.int32))
    torch.testing.assert_close(a, x + 1)
    assert b.tolist() == [2, 2, 2]
    assert runner.static_inputs[1][3].tolist() == [0] * 5  # the padded row


# --------------------------------------------------------------------------- the model runner

BS = 4
PROMPTS = {"a": [5, 9, 13, 17, 21], "b": [7, 3, 1], "c": [11, 12, 13, 14, 15, 16, 17, 18, 19]}


def _new(rid, tokens, blocks):
    return msg.NewRequest(
        request_id=rid,
        token_ids=tokens,
        block_ids=blocks,
        num_prompt_tokens=len(tokens),
        sampling_params=msg.SamplingParams(temperature=0, logprobs=3),
    )


def _steps():
    """Prefill two requests and decode them (2 rows), add a third beside their decodes (a mixed
    step: eager), decode all three (3 rows: padded to 4), finish one (2 rows), and go on past
    14 tokens of context."""
    blocks = {"a": list(range(0, 8)), "b": list(range(8, 16)), "c": list(range(16, 24))}
    steps = [
        msg.StepRequest(
            step_id=0,
            new_requests=[_new(r, p, blocks[r]) for r, p in PROMPTS.items() if r != "c"],
            num_scheduled_tokens={"a": 5, "b": 3},
        )
    ]
    computed = {"a": 5, "b": 3}
    for i in range(1, 16):
        new, finished = [], []
        if i == 4:
            new = [_new("c", PROMPTS["c"], blocks["c"])]
        if i == 8:
            finished = ["b"]
            del computed["b"]
        scheduled = {r: 1 for r in computed}
        if new:
            scheduled["c"] = len(PROMPTS["c"])
        steps.append(
            msg.StepRequest(
                step_id=i,
                new_requests=new,
                finished_request_ids=finished,
                cached_requests=[
                    msg.CachedRequest(request_id=r, num_computed_tokens=n)
                    for r, n in computed.items()
                ],
                num_scheduled_tokens=scheduled,
            )
        )
        for r in computed:
            computed[r] += 1
        if new:
            computed["c"] = len(PROMPTS["c"])
    return steps


def _run(runner, steps):
    results = []
    for step in steps:
        res = runner.execute(step)
        assert not res.errors, res.errors
        results.append(
            {
                rid: (tok, [round(x, 4) for x in lp.top_logprobs], list(lp.top_token_ids))
                for rid, tok, lp in zip(res.request_ids, res.token_ids, res.logprobs, strict=True)
            }
        )
    return results


def _assert_same(graphed, eager):
    for g, e in zip(graphed, eager, strict=True):
        assert g.keys() == e.keys()
        for rid in g:
            assert g[rid][0] == e[rid][0] and g[rid][2] == e[rid][2]
            assert g[rid][1] == pytest.approx(e[rid][1], abs=2e-4)


@pytest.fixture(scope="module")
def llama_d16(checkpoint):
    return checkpoint("llama_d16", head_dim=16, eos=[2])  # the kernels want head_dim >= 16


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_decode_steps_match_eager(llama_d16, backend):
    """The runner's graph path, uncaptured (without CUDA the padded batch runs eagerly: the same
    rows, kernels and fixed-shape metadata a graph replays; Triton runs in the interpreter).
    Padded rows must write nothing and change nothing."""
    if backend == "triton" and not torch.cuda.is_available():
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    config = dict(
        model=str(llama_d16),
        kv_cache_memory=1 << 20,
        max_seq_len_to_capture=14,
        attention_backend=backend,
        device="cuda" if torch.cuda.is_available() else "cpu",
        enforce_eager=True,
    )
    eager, graphed = (ModelRunner(WorkerConfig(**config)) for _ in range(2))
    for runner in (eager, graphed):
        runner.initialize_cache(64, BS)
    assert graphed.graphs is None  # enforce_eager: nothing captured
    graphed.graphs = graphed.make_decode_graphs([2, 4, 8], BS)
    seen = []
    forward = graphed.graphs.runner.fn

    def spy(ids, positions, slots, tables, seq_lens):
        seen.append((ids.shape[0], slots.tolist(), seq_lens.tolist()))
        return forward(ids, positions, slots, tables, seq_lens)

    graphed.graphs.runner.fn = spy
    steps = _steps()
    _assert_same(_run(graphed, steps), _run(eager, steps))
    # steps 1-3: 2 decodes; 4: mixed (eager); 5-7: 3 decodes padded to 4; 8-9: 2 decodes;
    # from 10 on, contexts pass max_seq_len_to_capture = 14 (eager again)
    assert [n for n, _, _ in seen] == [2, 2, 2, 4, 4, 4, 2, 2]
    for n, slots, seq_lens in seen:
        live = 3 if n == 4 else 2
        assert slots[live:] == [-1] * (n - live) and seq_lens[live:] == [0] * (n - live)
        assert max(seq_lens) <= 14
    for (k1, v1), (k2, v2) in zip(graphed.kv_cache.caches, eager.kv_cache.caches, strict=True):
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)


def test_eager_fallback_decision(tiny_llama):
    runner = ModelRunner(
        WorkerConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, max_seq_len_to_capture=64)
    )
    graphs = runner.make_decode_graphs([1, 2, 4], BS)
    assert graphs.max_seq_len == 64
    assert graphs.can_run(3, 1, 64)
    assert not graphs.can_run(3, 2, 10)  # a multi-token query: prefill or mixed
    assert not graphs.can_run(5, 1, 10)  # beyond the largest size
    assert not graphs.can_run(3, 1, 65)  # a context past max_seq_len_to_capture
    assert graphs.runner.static_inputs[3].shape == (4, 64 // BS)  # block tables
    # the cap never exceeds the model's context
    capped = ModelRunner(WorkerConfig(model=str(tiny_llama), kv_cache_memory=1 << 20))
    assert capped.make_decode_graphs([1], BS).max_seq_len == capped.max_model_len == 256


def test_capture_sizes_follow_the_config(tiny_llama, monkeypatch):
    from splitserve.worker.attention import TritonAttentionBackend

    def sizes(**kw):
        runner = ModelRunner(WorkerConfig(model=str(tiny_llama), **kw))
        monkeypatch.setattr(runner, "device", torch.device("cuda"))  # no tensor is made
        monkeypatch.setattr(runner, "backend", TritonAttentionBackend())
        return runner.graph_sizes()

    assert sizes(max_num_seqs=20) == [1, 2, 4, 8, 16, 24]
    assert sizes(cuda_graph_sizes=[16]) == [1, 2, 4, 8, 16]
    assert sizes(cuda_graph_sizes=["3", "1"]) == [1, 3]  # as the generated CLI passes them
    assert sizes(max_cudagraph_capture_size=4) == [1, 2, 4]
    assert sizes(max_cudagraph_capture_size=0) == []
    assert sizes(enforce_eager=True) == []


def test_cpu_runner_never_builds_graphs(tiny_llama, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU runner built CUDA graphs")

    monkeypatch.setattr(model_runner, "DecodeGraphs", refuse)
    runner = ModelRunner(
        WorkerConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, cuda_graph_sizes=[1, 2])
    )
    assert runner.config.enforce_eager is False and runner.graph_sizes() == []
    runner.describe(BS)
    runner.initialize_cache(64, BS)
    assert runner.graphs is None
    _run(runner, _steps()[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_decode_matches_eager_on_gpu(llama_d16):
    """The same steps with and without CUDA graphs (Triton kernels both ways): same tokens,
    same top logprobs; graphs really replay, and long contexts fall back to eager."""
    config = dict(model=str(llama_d16), device="cuda", max_seq_len_to_capture=14)
    eager = ModelRunner(WorkerConfig(**config, enforce_eager=True))
    graphed = ModelRunner(WorkerConfig(**config, cuda_graph_sizes=[1, 2, 4, 8]))
    for runner in (eager, graphed):
        runner.initialize_cache(64, BS)
    assert eager.graphs is None and set(graphed.graphs.runner.graphs) == {1, 2, 4, 8}
    replays = []
    run = graphed.graphs.runner.run
    graphed.graphs.runner.run = lambda *a: replays.append(a[0].shape[0]) or run(*a)
    steps = _steps()
    _assert_same(_run(graphed, steps), _run(eager, steps))
    assert replays == [2, 2, 2, 3, 3, 3, 2, 2]  # rows per replay (see the CPU test)
    # and the budget accounts for graph memory: a trial capture reports a positive size
    fresh = ModelRunner(WorkerConfig(**config, cuda_graph_sizes=[1, 2, 4, 8]))
    assert fresh._graph_memory(BS) > 0
