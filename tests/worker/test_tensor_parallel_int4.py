"""Int4 checkpoints (AWQ and compressed-tensors W4A16, `splitserve.testing.int4_pack`) under
tensor and expert parallelism: each TP rank reads only its slices of the packed weights, group
scales and zero points (dense Llama layers, Qwen3-MoE experts) and holds exactly its slice of
the dequantized weights; EP ranks read and hold only their experts, one stack entry per local
slot; TP = 2 and EP = 2 give the greedy tokens of one rank and of transformers on the
dequantized checkpoint; a rank's slice that is not whole groups is refused at start-up."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from splitserve.testing.int4_pack import pack_checkpoint
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_loader import check_model, load_model

from .test_eplb_ranks import check_eplb_on_skewed
from .test_pipeline_parallel import _transformers_greedy, _workload
from .test_tensor_parallel import GridWorkers, _one_rank, check_tp_and_ep, spy_reads

GROUP = 16
"""Whole groups on both ranks of 2: o_proj's 16 input features a rank, down_proj's 32 (dense)
or 16 (experts)."""
LAYERS = 2
ATTN, MLP = "self_attn", "mlp"
PROJS = [f"{ATTN}.{p}_proj" for p in "qkvo"] + [f"{MLP}.{p}_proj" for p in ("gate", "up", "down")]
ROW_PARALLEL = ("o_proj", "down_proj")
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1])  # fmt: skip
MOE = "model.layers.0.mlp.experts"
EXPERT_PROJS = ("gate", "up", "down")


@pytest.fixture(scope="module")
def packed(checkpoint, tmp_path_factory):
    """(arch, format, group, experts' intermediate size) -> (int4 folder, dequantized
    folder), built on first use."""
    root = tmp_path_factory.mktemp("int4_tp")
    built: dict[tuple, tuple] = {}

    def get(arch: str, fmt: str, group: int = GROUP, inter: int = 32):
        key = (arch, fmt, group, inter)
        if key not in built:
            kwargs = dict(QWEN_MOE, moe_intermediate_size=inter) if arch == "qwen3_moe" else {}
            name = f"{arch}_{inter}_tp_int4"
            source = checkpoint(name, arch=arch, num_layers=LAYERS, **kwargs)
            built[key] = pack_checkpoint(source, root / f"{name}-{fmt}-{group}", fmt, group)
        return built[key]

    return get


def _expected_whole(fmt: str) -> set[str]:
    """What a dense rank may read whole: norms, compressed-tensors' `weight_shape`, and a
    row-parallel layer's per-channel scale (one per output); never a packed weight, a group
    scale or zero point, or a column-parallel layer's scale."""
    names = {"model.norm.weight"}
    for i in range(LAYERS):
        layer = f"model.layers.{i}"
        names |= {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"}
        for proj in PROJS:
            if fmt != "awq":
                names.add(f"{layer}.{proj}.weight_shape")
            if fmt == "w4a16-channel" and proj.endswith(ROW_PARALLEL):
                names.add(f"{layer}.{proj}.weight_scale")
    return names


def _rank_weights(dense: dict[str, torch.Tensor], layer: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank` of 2's slices of one dense layer's weights (see the test below)."""
    pre = f"model.layers.{layer}"
    q, k, v, o = (dense[f"{pre}.{ATTN}.{p}_proj.weight"] for p in "qkvo")
    gate, up, down = (dense[f"{pre}.{MLP}.{p}_proj.weight"] for p in ("gate", "up", "down"))
    # 4 query heads of 8 dims -> 2 a rank; 2 KV heads -> 1; 64 MLP features -> 32.
    qs, ks, ms = slice(16 * rank, 16 * rank + 16), slice(8 * rank, 8 * rank + 8), slice(32 * rank, 32 * rank + 32)  # fmt: skip
    return {
        f"{ATTN}.qkv_proj": torch.cat([q[qs], k[ks], v[ks]]),
        f"{ATTN}.o_proj": o[:, qs],
        f"{MLP}.gate_up_proj": torch.cat([gate[ms], up[ms]]),
        f"{MLP}.down_proj": down[:, ms],
    }


@pytest.mark.parametrize("fmt", ["awq", "w4a16", "w4a16-asym", "w4a16-channel"])
def test_each_rank_reads_only_its_slices_of_int4_tensors(fmt, packed, monkeypatch):
    """Both ranks of 2: what each reads whole is only what it keeps whole, and its dequantized
    q/k/v, o, gate/up and down weights are exactly its slices of the one-rank weights (a
    scale, zero point or pack cut apart from its weight would change values)."""
    folder, dense_folder = packed("llama", fmt)
    check_model(WorkerConfig(model=str(folder), tensor_parallel_size=2))  # preflight accepts
    dense = load_file(dense_folder / "model.safetensors")
    whole = spy_reads(monkeypatch, "materialize")
    for rank in range(2):
        whole.clear()
        config = WorkerConfig(model=str(folder), tensor_parallel_size=2, tp_rank=rank)
        params = load_model(config).model.state_dict()  # dequantized on CPU
        assert set(whole) == _expected_whole(fmt), sorted(set(whole) ^ _expected_whole(fmt))
        for i in range(LAYERS):
            for name, value in _rank_weights(dense, i, rank).items():
                got = params[f"model.layers.{i}.{name}.weight"]
                assert got.dtype == torch.float32 and torch.equal(got, value), (rank, name)


@pytest.mark.parametrize("fmt", ["awq", "w4a16-asym", "w4a16-channel"])
def test_each_rank_keeps_its_slice_in_the_int4_form_a_gpu_runs(fmt, packed, monkeypatch):
    """The form a CUDA rank keeps for the W4A16 GEMM (forced here on CPU, computed by the
    kernel's torch reference): each projection's repacked int4 weight, scales and zeros give
    exactly its slice of the dequantized weights (its partial product for o / down)."""
    from splitserve.worker.quantization import int4

    monkeypatch.setattr(int4, "keeps_packed", lambda t: True)
    folder, dense_folder = packed("llama", fmt)
    dense = load_file(dense_folder / "model.safetensors")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for rank in range(2):
        config = WorkerConfig(model=str(folder), tensor_parallel_size=2, tp_rank=rank)
        layer = load_model(config).model.model.layers[1]
        for name, weight in _rank_weights(dense, 1, rank).items():
            proj = layer.get_submodule(name)
            assert not proj.int4_dense and proj.int4_qweight.dtype == torch.int32, name
            xs = x[:, : weight.shape[1]]
            got = proj.method.apply(proj, xs)  # this rank's part, before any all-reduce
            torch.testing.assert_close(got, xs @ weight.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["awq", "w4a16", "w4a16-asym"])
def test_each_tp_rank_reads_only_its_slices_of_int4_experts(fmt, packed, monkeypatch):
    """Both ranks of 2: no expert tensor is read whole but compressed-tensors' `weight_shape`,
    and every dequantized expert is its rows of gate / up and columns of down."""
    folder, dense_folder = packed("qwen3_moe", fmt)
    dense = load_file(dense_folder / "model.safetensors")
    whole = spy_reads(monkeypatch, "materialize")
    expected = set()
    if fmt != "awq":
        expected = {f"{MOE}.{e}.{p}_proj.weight_shape" for e in range(4) for p in EXPERT_PROJS}
    for rank in range(2):
        whole.clear()
        config = WorkerConfig(model=str(folder), tensor_parallel_size=2, tp_rank=rank)
        experts = load_model(config).model.model.layers[0].mlp.experts
        read = {n for n in whole if ".experts." in n}
        assert read == expected, sorted(read ^ expected)
        rows = slice(16 * rank, 16 * rank + 16)  # 32 intermediate features -> 16 a rank
        assert experts.gate_up_proj.shape == (4, 32, 32)
        for e in range(4):
            gate, up, down = (dense[f"{MOE}.{e}.{p}_proj.weight"] for p in EXPERT_PROJS)
            assert torch.equal(experts.gate_up_proj[e], torch.cat([gate[rows], up[rows]])), e
            assert torch.equal(experts.down_proj[e], down[:, rows]), e


@pytest.mark.parametrize("fmt", ["awq", "w4a16"])
def test_expert_parallel_reads_and_stacks_only_local_int4_experts(fmt, packed, monkeypatch):
    """EP rank 1 of 2 reads only experts 2 and 3, sizes its int4 stacks by its 2 slots (what
    EPLB moves along dim 0) and holds those experts whole."""
    from splitserve.worker.quantization.int4 import Int4MoEMethod

    stacked: dict[str, int] = {}
    process = Int4MoEMethod.process_weights_after_loading

    def record(self, experts):
        for name, param in experts.named_parameters(recurse=False):
            stacked[name] = param.shape[0]
        return process(self, experts)

    monkeypatch.setattr(Int4MoEMethod, "process_weights_after_loading", record)
    folder, dense_folder = packed("qwen3_moe", fmt)
    read = spy_reads(monkeypatch, "materialize", "narrow")
    config = WorkerConfig(
        model=str(folder), tensor_parallel_size=2, tp_rank=1, enable_expert_parallel=True
    )
    experts = load_model(config).model.model.layers[0].mlp.experts
    read_experts = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert read_experts == {2, 3}
    assert len(stacked) >= 6 and set(stacked.values()) == {2}, stacked  # packed, scales, ...
    assert experts.gate_up_proj.shape == (2, 64, 32)
    dense = load_file(dense_folder / "model.safetensors")
    for slot, e in enumerate((2, 3)):
        gate, up, down = (dense[f"{MOE}.{e}.{p}_proj.weight"] for p in EXPERT_PROJS)
        assert torch.equal(experts.gate_up_proj[slot], torch.cat([gate, up]))
        assert torch.equal(experts.down_proj[slot], down)


# NOTE: on CPU every int4 format is dequantized at load and runs the unquantized linear and
# experts paths (int4.keeps_packed), so past loading one grid per layout runs the code of any
# format: the dense TP grid runs AWQ, the MoE TP / EP grids compressed-tensors W4A16, the EPLB
# grid AWQ. Each format's loading is checked per rank above (dense slices: every format;
# expert slices under TP: AWQ, W4A16, W4A16-asym; local experts under EP: AWQ, W4A16).
@pytest.mark.parametrize("fmt", ["awq"])
def test_tp2_int4_matches_one_rank_and_transformers(fmt, packed, tmp_path):
    folder, dense_folder = packed("llama", fmt)
    workload = _workload(96)[:6]
    grid = GridWorkers(folder, 1, 2, tmp_path, 60)
    try:
        one = _one_rank(folder, workload)
        assert one == _transformers_greedy(dense_folder, workload)
        assert grid.generate(workload) == one, f"{fmt}: TP=2 differs from one rank"
    finally:
        grid.kill()


@pytest.mark.parametrize("fmt", ["w4a16"])
def test_tp2_and_ep2_int4_moe_match_one_rank_and_transformers(fmt, packed, tmp_path):
    folder, dense_folder = packed("qwen3_moe", fmt)
    workload = _workload(96)[:6]
    check_tp_and_ep(folder, dense_folder, workload, tmp_path, f"{fmt}")


@pytest.mark.parametrize("fmt", ["awq", "w4a16-asym"])
def test_a_slice_that_is_not_whole_groups_is_refused(fmt, packed):
    """Group 32: o_proj's 16 input features a rank are half a group. Group 16 with 48
    intermediate features: the experts' 24 a rank are not whole groups of down; whole experts
    under EP load."""
    folder, _ = packed("llama", fmt, 32)
    check_model(WorkerConfig(model=str(folder)))  # one rank: the same checkpoint loads
    with pytest.raises(
        ValueError,
        match=r"int4 group_size 32 \(8 values per int32\): tensor parallelism gives each of 2 "
        r"ranks 16 of the 32 input features, not a whole number of 32-column blocks",
    ):
        check_model(WorkerConfig(model=str(folder), tensor_parallel_size=2))
    folder, _ = packed("qwen3_moe", fmt, GROUP, 48)
    check_model(WorkerConfig(model=str(folder)))
    check_model(WorkerConfig(model=str(folder), tensor_parallel_size=2, enable_expert_parallel=True))  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"int4 group_size 16 \(8 values per int32\): tensor parallelism gives each of 2 "
        r"ranks 24 of the experts' 48 intermediate features, not a whole number of 16-column "
        r"blocks of down",
    ):
        check_model(WorkerConfig(model=str(folder), tensor_parallel_size=2))


@pytest.mark.parametrize(
    "tensor, shape, message",
    [
        # k: rank 1 holds rows [8, 16) of the 16 the config gives; the checkpoint says 8.
        ("self_attn.k_proj", [8, 32], r"shard 'k' weight_shape says \[8, 32\], the model "
         r"expects 32 inputs and this tensor-parallel rank's output rows \[8, 16\)"),
        # o_proj: row-parallel, the checkpoint layer's 32 inputs (16 a rank) are checked.
        ("self_attn.o_proj", [32, 16], r"weight_shape says \[32, 16\], the model expects "
         r"\[32, 32\]"),
    ],
)  # fmt: skip
def test_w4a16_weight_shape_is_checked_against_the_checkpoint_layer(tensor, shape, message, packed, tmp_path):  # fmt: skip
    """A rank checks compressed-tensors' stated shape against the whole checkpoint layer, not
    against its own slice."""
    from .test_quantization import _edited

    def edit(state):
        state[f"model.layers.0.{tensor}.weight_shape"] = torch.tensor(shape)

    folder = _edited(packed("llama", "w4a16")[0], tmp_path / "edited", state_edit=edit)
    config = WorkerConfig(model=str(folder), tensor_parallel_size=2, tp_rank=1)
    with pytest.raises(ValueError, match=message):
        load_model(config)


def test_ep2_with_eplb_on_int4_experts_moves_them_and_keeps_the_tokens(packed, tmp_path):
    """EPLB over AWQ experts (`check_eplb_on_skewed`)."""
    folder, dense_folder = packed("qwen3_moe", "awq")
    check_eplb_on_skewed(folder, dense_folder, tmp_path)
