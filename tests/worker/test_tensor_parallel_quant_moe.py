"""FP8 MoE experts under tensor and expert parallelism, packed from tiny random Qwen3-MoE and
Mixtral models (`splitserve.testing.fp8_pack`): under TP each rank reads only its slice of every
expert's FP8 weights and scales (per-tensor scales whole, block scales by whole blocks), under EP
only its own experts; the FP8 form a GPU keeps (weights + scale stacks) has one entry per local
slot, so EPLB moves scales with their weights; TP = 2, EP = 2 and EP = 2 with EPLB give the
greedy tokens of one rank and of transformers on the dequantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from splitserve.entrypoints.launcher import free_port
from splitserve.kernels import dispatch
from splitserve.testing.fp8_moe_ranks import ep_fp8_native_layer
from splitserve.testing.fp8_pack import FORMATS, pack_checkpoint
from splitserve.worker.config import WorkerConfig
from splitserve.worker.eplb import EplbConfig, EplbState
from splitserve.worker.model_loader import check_model, load_model

from .test_eplb_ranks import check_eplb_on_skewed
from .test_pipeline_parallel import _workload
from .test_tensor_parallel import check_tp_and_ep, spy_reads

BLOCK = (8, 16)
"""Whole blocks on both ranks of 2: gate / up rows (16 a rank), down columns (16 a rank), and
the dense layers' (see test_tensor_parallel_quant.TP_BLOCK)."""
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1])  # fmt: skip
MOE = "model.layers.0.mlp.experts"
PROJS = ("gate", "up", "down")


@pytest.fixture(scope="module")
def packed(checkpoint, tmp_path_factory):
    """(arch, format, moe_intermediate_size, block) -> (FP8 folder, dequantized folder)."""
    root = tmp_path_factory.mktemp("fp8_moe_tp")
    built: dict[tuple, tuple] = {}

    def get(arch: str, fmt: str, inter: int = 32, block: tuple[int, int] = BLOCK):
        key = (arch, fmt, inter, block)
        if key not in built:
            if arch == "mixtral":
                kwargs = dict(num_local_experts=4, num_experts_per_tok=2)
            else:
                kwargs = dict(QWEN_MOE, moe_intermediate_size=inter)
            source = checkpoint(f"{arch}_{inter}_fp8_moe", arch=arch, num_layers=2, **kwargs)
            name = "-".join(map(str, (arch, fmt, inter, *block)))
            built[key] = pack_checkpoint(source, root / name, fmt, block)
        return built[key]

    return get


def _expert(state: dict[str, torch.Tensor], e: int, proj: str, param: str = "weight"):
    return state[f"{MOE}.{e}.{proj}_proj.{param}"]


def _whole_expert_tensors(fmt: str) -> set[str]:
    """What a TP rank may read whole of the experts: per-tensor and input scales, down's
    per-channel scales (one per hidden output, every rank keeps them); never an FP8 weight,
    a block scale or a gate / up per-channel scale."""
    kind, scale_name, extra = FORMATS[fmt][1:]
    names = set()
    for e in range(4):
        for proj in PROJS:
            if kind == "tensor" or (kind == "channel" and proj == "down"):
                names.add(f"{MOE}.{e}.{proj}_proj.{scale_name}")
            if "input_scale" in extra:
                names.add(f"{MOE}.{e}.{proj}_proj.input_scale")
    return names


@pytest.mark.parametrize("fmt", ["fp8-tensor", "fp8-block", "ct-channel"])
def test_each_rank_reads_only_its_slices_of_fp8_experts(fmt, packed, monkeypatch):
    """Both ranks of 2: the experts' tensors read whole are only those kept whole, and every
    dequantized expert is exactly its rows of gate / up and columns of down of the one-rank
    dequantized weights (a scale sliced apart from its weight would change values)."""
    folder, dense_folder = packed("qwen3_moe", fmt)
    dense = load_file(dense_folder / "model.safetensors")
    whole = spy_reads(monkeypatch, "materialize")
    for rank in range(2):
        whole.clear()
        config = WorkerConfig(model=str(folder), tensor_parallel_size=2, tp_rank=rank)
        experts = load_model(config).model.model.layers[0].mlp.experts
        read = {n for n in whole if ".experts." in n}
        assert read == _whole_expert_tensors(fmt), sorted(read ^ _whole_expert_tensors(fmt))
        rows = slice(16 * rank, 16 * rank + 16)  # 32 intermediate features -> 16 a rank
        assert experts.gate_up_proj.shape == (4, 32, 32)
        for e in range(4):
            gate, up, down = (_expert(dense, e, p) for p in PROJS)
            assert torch.equal(experts.gate_up_proj[e], torch.cat([gate[rows], up[rows]])), e
            assert torch.equal(experts.down_proj[e], down[:, rows]), e


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_each_rank_keeps_its_fp8_expert_bytes_and_block_scales(mode, packed, monkeypatch):
    """The form a GPU with FP8 tensor cores keeps (forced here on CPU): FP8 stacks and block
    scale stacks, under TP each rank's slice of every expert (gate / up: 2 of 4 block rows;
    down: 1 of 2 block columns), under EP rank r's experts 2r, 2r + 1 whole, one per slot."""
    monkeypatch.setattr(dispatch, "fp8_moe_native", lambda device, block: True)
    folder, _ = packed("qwen3_moe", "fp8-block")
    ckpt = load_file(folder / "model.safetensors")
    extra = {"enable_expert_parallel": True} if mode == "ep" else {}
    for rank in range(2):
        config = WorkerConfig(model=str(folder), tensor_parallel_size=2, tp_rank=rank, **extra)
        experts = load_model(config).model.model.layers[0].mlp.experts
        assert experts.fp8_native and experts.gate_up_proj.dtype == torch.float8_e4m3fn
        if mode == "ep":
            assert experts.slot_experts == [2 * rank, 2 * rank + 1]
        num = experts.num_local_experts
        assert {p.shape[0] for p in experts.parameters(recurse=False)} == {num}
        for slot, e in enumerate(experts.slot_experts):
            gate, up, down = (_expert(ckpt, e, p) for p in PROJS)
            sg, su, sd = (_expert(ckpt, e, p, "weight_scale_inv") for p in PROJS)
            if mode == "tp":
                rows, blocks = slice(16 * rank, 16 * rank + 16), slice(2 * rank, 2 * rank + 2)
                gate, up, down, sd = gate[rows], up[rows], down[:, rows], sd[:, rank : rank + 1]
                sg, su = sg[blocks], su[blocks]
            assert torch.equal(_u8(experts.gate_up_proj[slot]), _u8(torch.cat([gate, up])))
            assert torch.equal(_u8(experts.down_proj[slot]), _u8(down))
            assert torch.equal(experts.gate_up_proj_scale[slot], torch.cat([sg, su]))
            assert torch.equal(experts.down_proj_scale[slot], sd)


@pytest.mark.parametrize("fmt", ["fp8-block", "ct-block"])
def test_tp_ranks_fp8_experts_sum_to_one_ranks(fmt, packed, monkeypatch):
    """In the FP8 form (forced on CPU, run by the grouped GEMM's torch path), the two ranks'
    partial expert outputs (what SparseMoE all-reduces) add up to the one-rank experts'."""
    monkeypatch.setattr(dispatch, "fp8_moe_native", lambda device, block: True)
    folder, _ = packed("qwen3_moe", fmt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 32, generator=gen)
    weights = torch.rand(24, 2, generator=gen)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(24)])

    def experts_out(**tp) -> torch.Tensor:
        experts = load_model(WorkerConfig(model=str(folder), **tp)).model.model.layers[0].mlp.experts  # fmt: skip
        assert experts.fp8_native
        return experts(x, weights, ids)

    parts = [experts_out(tensor_parallel_size=2, tp_rank=r) for r in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], experts_out())


@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-tensor"])
def test_expert_parallel_reads_only_local_fp8_experts(fmt, packed, monkeypatch):
    folder, dense_folder = packed("qwen3_moe", fmt)
    read = spy_reads(monkeypatch, "materialize", "narrow")
    config = WorkerConfig(
        model=str(folder), tensor_parallel_size=2, tp_rank=1, enable_expert_parallel=True
    )
    experts = load_model(config).model.model.layers[0].mlp.experts
    read_experts = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert read_experts == {2, 3}
    assert experts.gate_up_proj.shape == (2, 64, 32)  # whole experts, dequantized on CPU
    dense = load_file(dense_folder / "model.safetensors")
    for slot, e in enumerate((2, 3)):
        gate, up, down = (_expert(dense, e, p) for p in PROJS)
        assert torch.equal(experts.gate_up_proj[slot], torch.cat([gate, up]))
        assert torch.equal(experts.down_proj[slot], down)


@pytest.mark.parametrize(
    "inter, message",
    [
        # 48 features -> 24 a rank: whole 8-row blocks of gate / up, not 16-column ones of down.
        (48, r"gives each of 2 ranks 24 of the experts' 48 intermediate features, not a whole "
         r"number of 16-column blocks of down"),
        # 40 -> 20 a rank: not whole 8-row blocks of gate / up.
        (40, r"gives each of 2 ranks 20 of the experts' 40 intermediate features, not a whole "
         r"number of 8-row blocks of gate / up"),
    ],
)  # fmt: skip
def test_an_expert_block_scale_that_slices_mid_block_is_refused(inter, message, packed):
    folder, _ = packed("qwen3_moe", "fp8-block", inter)
    check_model(WorkerConfig(model=str(folder)))  # one rank: the same checkpoint loads
    # Whole experts on each rank: nothing to cut.
    check_model(WorkerConfig(model=str(folder), tensor_parallel_size=2, enable_expert_parallel=True))  # fmt: skip
    with pytest.raises(ValueError, match=message):
        check_model(WorkerConfig(model=str(folder), tensor_parallel_size=2))


def test_eplb_moves_fp8_scales_with_their_weights(packed, monkeypatch):
    """The FP8 form (forced on CPU): EPLB widens and rearranges the scale stacks with the
    weight stacks, so after a rebalance every slot's FP8 bytes and block scales are those of
    the expert the map says it holds, and the layer computes as before."""
    monkeypatch.setattr(dispatch, "fp8_moe_native", lambda device, block: True)
    folder, _ = packed("qwen3_moe", "fp8-block")
    ckpt = load_file(folder / "model.safetensors")
    model = load_model(WorkerConfig(model=str(folder))).model
    layer = model.model.layers[0].mlp
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))
    before = layer(x)
    state = EplbState.attach(model, EplbConfig(num_redundant_experts=2), num_ranks=2)
    result = state.rebalance(torch.tensor([[1.0, 2.0, 40.0, 3.0]]))  # expert 2 is hot
    placement = state.map.phy2log[0].tolist()
    assert result.changed_layers == 1 and placement.count(2) > 1, placement  # replicated
    experts = layer.experts
    assert experts.gate_up_proj_scale.shape[0] == 6 and experts.down_proj_scale.shape[0] == 6
    for slot, e in enumerate(placement):
        gate, up, down = (_expert(ckpt, e, p) for p in PROJS)
        sg, su, sd = (_expert(ckpt, e, p, "weight_scale_inv") for p in PROJS)
        assert torch.equal(_u8(experts.gate_up_proj[slot]), _u8(torch.cat([gate, up]))), slot
        assert torch.equal(_u8(experts.down_proj[slot]), _u8(down)), slot
        assert torch.equal(experts.gate_up_proj_scale[slot], torch.cat([sg, su])), slot
        assert torch.equal(experts.down_proj_scale[slot], sd), slot
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)


def test_ep2_runs_and_rebalances_the_fp8_form_a_gpu_keeps(packed):
    """Two gloo ranks with expert parallelism and EPLB, the experts held as FP8 stacks with
    block scales (forced on CPU): `ep_moe` runs them through the experts' FP8 method, and
    after EPLB moves experts between the ranks (weights and scales) the layer still equals
    one rank's (`splitserve.testing.fp8_moe_ranks`)."""
    folder, _ = packed("qwen3_moe", "fp8-block")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(target=ep_fp8_native_layer, args=(r, 2, init, str(folder), out))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted(out.get(timeout=5) for _ in range(2))
    assert [moved for _, moved, _ in results] == [1, 1], results
    assert sum(received for *_, received in results) > 0, "no expert crossed ranks"


# NOTE: on CPU (dispatch.fp8_moe_native false) FP8 experts are dequantized at load and run the
# unquantized fused-MoE path, so past loading the format does not change the code a grid runs.
# Qwen3-MoE fp8-tensor (per-shard weight scales, static input scales) is checked per rank
# instead: its slices under TP and its local experts under EP, above.
@pytest.mark.parametrize(
    "arch, fmt",
    [
        ("qwen3_moe", "fp8-block"),
        ("mixtral", "ct-channel"),  # block_sparse_moe w1 / w3 / w2; down's channel scales whole
    ],
)
def test_tp2_and_ep2_fp8_moe_match_one_rank_and_transformers(arch, fmt, packed, tmp_path):
    folder, dense_folder = packed(arch, fmt)
    workload = _workload(96)[:8]
    check_tp_and_ep(folder, dense_folder, workload, tmp_path, f"{arch} {fmt}")


def test_ep2_with_eplb_on_fp8_experts_moves_them_and_keeps_the_tokens(packed, tmp_path):
    """EPLB over block-FP8 experts (`check_eplb_on_skewed`)."""
    folder, dense_folder = packed("qwen3_moe", "fp8-block")
    check_eplb_on_skewed(folder, dense_folder, tmp_path)
