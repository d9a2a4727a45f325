"""Block-scaled FP8 experts kept FP8 where `dispatch.fp8_moe_native` says so (CUDA with FP8
tensor cores; pretended here), run on the FP8 grouped GEMM (interpreted on CPU) or, off the
Triton backend, dequantized on the fly; and dequantized at load everywhere else."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import dispatch
from splitserve.kernels.torch_grouped_gemm import fused_moe_fp8_ref
from splitserve.testing.fp8_pack import pack_checkpoint
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_loader import load_model
from splitserve.worker.moe import select_experts

QWEN3_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[1])  # fmt: skip
BLOCK = (8, 32)
# The Triton path runs compiled on a CUDA host, interpreted elsewhere (tests/worker/conftest).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def fp8_folders(checkpoint, tmp_path_factory):
    src = checkpoint("qwen3_moe_fp8g", arch="qwen3_moe", num_layers=2, **QWEN3_MOE)
    return pack_checkpoint(src, tmp_path_factory.mktemp("fp8g") / "block", "fp8-block", BLOCK)


def _routed(moe, num_tokens=9):
    x = torch.randn(num_tokens, 32, device=DEVICE)
    weights, ids = select_experts(moe.gate(x), moe.top_k, moe.renormalize)
    return x, weights, ids


@torch.inference_mode()
def test_fp8_experts_stay_fp8_and_match_the_dequantized_model(fp8_folders, monkeypatch):
    folder, dense_folder = fp8_folders
    config = dict(device=DEVICE.type)
    dense_moe = load_model(WorkerConfig(model=str(dense_folder), **config)).model.model.layers[0].mlp  # fmt: skip
    monkeypatch.setattr(dispatch, "fp8_moe_native", lambda device, block: block[1] % 32 == 0)
    moe = load_model(WorkerConfig(model=str(folder), **config)).model.model.layers[0].mlp
    experts = moe.experts
    assert experts.fp8_native and experts.fp8_block == BLOCK
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert experts.gate_up_proj_scale.shape == (4, 48 // 8, 1)
    assert experts.down_proj_scale.shape == (4, 32 // 8, 1)
    stacks = (experts.gate_up_proj, experts.gate_up_proj_scale, experts.down_proj)
    stacks = (*stacks, experts.down_proj_scale, BLOCK)
    x, weights, ids = _routed(moe)
    # Off the Triton backend: the stacks dequantized on the fly, weight-only.
    weight_only = dispatch.fused_moe_fp8(x, *stacks, weights, ids, backend="torch")
    torch.testing.assert_close(weight_only, dense_moe.experts(x, weights, ids), atol=1e-5, rtol=1e-5)  # fmt: skip

    # The Triton path (what the experts run on CUDA): the FP8 grouped GEMM with per-token,
    # per-32-feature activation scales.
    real = dispatch.fused_moe_fp8
    calls = []

    def on_triton(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, backend="triton")

    monkeypatch.setattr(dispatch, "fused_moe_fp8", on_triton)
    for num_tokens in (1, 9, 70):  # masked layout for decode sizes, contiguous past them
        x, weights, ids = _routed(moe, num_tokens)
        out = experts(x, weights, ids)
        expected = fused_moe_fp8_ref(x, *stacks, weights, ids)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        # Quantizing the activations to FP8 costs a few percent against the dense model.
        dense = dense_moe.experts(x, weights, ids)
        assert (out - dense).abs().max() <= 0.1 * dense.abs().max()
    assert calls == [1, 9, 70]


def test_fp8_experts_are_dequantized_where_not_native(fp8_folders):
    folder, _ = fp8_folders
    assert not dispatch.fp8_moe_native("cpu", BLOCK)
    assert not dispatch.fp8_moe_native("cpu", (128, 128))
    experts = (
        load_model(WorkerConfig(model=str(folder), device="cpu")).model.model.layers[0].mlp.experts
    )
    assert not experts.fp8_native and experts.gate_up_proj.dtype == torch.float32
    assert not hasattr(experts, "gate_up_proj_scale")


@torch.inference_mode()
def test_eplb_moves_fp8_experts_with_their_scales(fp8_folders, monkeypatch):
    from splitserve.worker.eplb import EplbConfig, EplbState

    folder, _ = fp8_folders
    monkeypatch.setattr(dispatch, "fp8_moe_native", lambda device, block: True)
    model = load_model(WorkerConfig(model=str(folder), device="cpu")).model
    moe = model.model.layers[0].mlp
    x = torch.randn(11, 32)
    expected = moe(x)
    state = EplbState.attach(model, EplbConfig(num_redundant_experts=2), num_ranks=2)
    assert [t.dtype for t in state.stacks(0)].count(torch.float8_e4m3fn) == 2
    assert len(state.stacks(0)) == 4 and all(t.shape[0] == 6 for t in state.stacks(0))
    skew = torch.ones(1, 4)
    skew[0, 3] = 100.0
    before = state.map.placement(0)
    state.rebalance(skew)
    assert state.map.placement(0) != before and state.map.placement(0).count(3) == 3
    torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)
