"""CUDA-graph sizing logic (anywhere) and capture/replay parity (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from splitserve.worker.cuda_graphs import (
    CudaGraphRunner,
    capture_sizes,
    padded_batch_size,
    should_run_eager,
)


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
