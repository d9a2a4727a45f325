"""Gloo rank bodies for the FP8 MoE expert-parallel tests (a spawned process imports its target
from an installed module, not from the tests folder)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def ep_fp8_native_layer(rank: int, size: int, init: str, folder: str, out) -> None:
    """Rank `rank` of `size` with --enable-expert-parallel and EPLB (2 spare slots) on a
    block-scaled FP8 checkpoint, holding its experts in the form a GPU with FP8 tensor cores
    keeps (FP8 stacks + block scale stacks; forced here, run by the grouped GEMM's torch path):
    its first MoE layer's output equals the one-rank layer's before EPLB, after attaching it,
    and after a rebalance to a skewed load moves experts (their FP8 bytes and scales) between
    ranks. Puts (rank, layers moved, experts received) on `out`."""
    from splitserve.kernels import dispatch
    from splitserve.worker import parallel_state
    from splitserve.worker.config import WorkerConfig
    from splitserve.worker.eplb import EplbState
    from splitserve.worker.model_loader import load_model

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dispatch.fp8_moe_native = lambda device, block: True
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        parallel_state.set_tp_group(dist.new_group(list(range(size))), 0)
        one = load_model(WorkerConfig(model=folder)).model.model.layers[0].mlp
        x = torch.randn(24, one.gate.in_features, generator=torch.Generator().manual_seed(0))
        reference = one(x)
        config = WorkerConfig(
            model=folder,
            tensor_parallel_size=size,
            tp_rank=rank,
            enable_expert_parallel=True,
            enable_eplb=True,
            eplb_config={"num_redundant_experts": 2},
        )
        model = load_model(config).model
        layer = model.model.layers[0].mlp
        experts = layer.experts
        assert experts.fp8_native and experts.gate_up_proj.dtype == torch.float8_e4m3fn
        assert experts.gate_up_proj_scale.shape[0] == experts.num_local_experts
        torch.testing.assert_close(layer(x), reference)
        state = EplbState.attach(model, config.eplb)
        torch.testing.assert_close(layer(x), reference)
        result = state.rebalance(torch.tensor([[1.0, 2.0, 40.0, 3.0]]))  # expert 2 is hot
        torch.testing.assert_close(layer(x), reference)
        out.put((rank, result.changed_layers, result.received))
    finally:
        dist.destroy_process_group()
