"""FP8 checkpoints under tensor parallelism: each format packed from a tiny random model
(`splitserve.testing.fp8_pack`), every rank's dequantized slices equal to the matching slices of
the one-rank model's weights (each rank reading only its slices of the FP8 weights and of their
block / per-channel scales, and under P = 2 x T = 2 only its own layer's), TP = 2 greedy tokens
equal to one rank and to transformers on the dequantized weights, and the layouts tensor
parallelism cannot slice refused at preflight."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from splitserve.testing.fp8_pack import FORMATS, pack_checkpoint
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_loader import check_model, load_model

from .test_pipeline_parallel import _transformers_greedy, _workload
from .test_tensor_parallel import GridWorkers, _one_rank, spy_reads

TP_BLOCK = (8, 16)
"""A block both ranks' slices hold whole: k / v rows (8 a rank), o_proj / down_proj input
columns (16 / 32 a rank)."""
LAYERS = 2
ATTN, MLP = "self_attn", "mlp"
ROW_PARALLEL = ("o_proj", "down_proj")


@pytest.fixture(scope="module")
def packed(checkpoint, tmp_path_factory):
    """(arch, format) -> (FP8 folder, dequantized folder), built on first use."""
    root = tmp_path_factory.mktemp("fp8_tp")
    built: dict[tuple[str, str], tuple] = {}

    def get(arch: str, fmt: str, block: tuple[int, int] = TP_BLOCK):
        key = (arch, fmt + "-".join(map(str, block)))
        if key not in built:
            source = checkpoint(f"{arch}_tp_fp8", arch=arch, num_layers=LAYERS)
            built[key] = pack_checkpoint(source, root / f"{arch}-{fmt}-{key[1]}", fmt, block)
        return built[key]

    return get


def _expected_whole(fmt: str) -> set[str]:
    """The tensors a rank may read whole: norms, per-tensor scales and static input scales,
    and the per-channel scales of row-parallel layers (one per output, which every rank keeps);
    never an FP8 weight, a block scale or a column-parallel layer's per-channel scale."""
    kind, scale_name = FORMATS[fmt][1], FORMATS[fmt][2]
    names = set()
    for i in range(LAYERS):
        layer = f"model.layers.{i}"
        names |= {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"}
        projs = [f"{ATTN}.{p}_proj" for p in "qkvo"] + [f"{MLP}.{p}_proj" for p in ("gate", "up", "down")]  # fmt: skip
        for proj in projs:
            row = proj.endswith(ROW_PARALLEL)
            if kind == "tensor" or (kind == "channel" and row):
                names.add(f"{layer}.{proj}.{scale_name}")
            if "input_scale" in FORMATS[fmt][3]:
                names.add(f"{layer}.{proj}.input_scale")
    return names | {"model.norm.weight"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_rank_reads_only_its_slices_of_fp8_tensors(fmt, packed, monkeypatch):
    """Both ranks of 2: what each reads whole is only what it keeps whole, and its dequantized
    q/k/v, o, gate/up and down weights are exactly its slices of the one-rank weights (the
    scales were sliced with their weights: a misplaced scale row or block changes values)."""
    folder, dense_folder = packed("llama", fmt)
    check_model(WorkerConfig(model=str(folder), tensor_parallel_size=2))  # preflight accepts
    dense = load_file(dense_folder / "model.safetensors")
    whole = spy_reads(monkeypatch, "materialize")
    for rank in range(2):
        whole.clear()
        config = WorkerConfig(model=str(folder), tensor_parallel_size=2, tp_rank=rank)
        params = load_model(config).model.state_dict()  # dequantized on CPU, checkpoint form
        assert set(whole) == _expected_whole(fmt), sorted(set(whole) ^ _expected_whole(fmt))
        for i in range(LAYERS):
            _assert_rank_slices(params, dense, i, rank)


def _assert_rank_slices(params, dense: dict[str, torch.Tensor], layer: int, rank: int) -> None:
    """Rank `rank` of 2 holds, dequantized, exactly its slices of layer `layer`'s q/k/v, o,
    gate/up and down weights of the one-rank (dense) model."""
    pre = f"model.layers.{layer}"
    q, k, v, o = (dense[f"{pre}.{ATTN}.{p}_proj.weight"] for p in "qkvo")
    gate, up, down = (dense[f"{pre}.{MLP}.{p}_proj.weight"] for p in ("gate", "up", "down"))
    # 4 query heads of 8 dims -> 2 a rank; 2 KV heads -> 1; 64 MLP features -> 32.
    qs, ks, ms = (slice(n * rank, n * rank + n) for n in (16, 8, 32))
    expect = {
        f"{ATTN}.qkv_proj": torch.cat([q[qs], k[ks], v[ks]]),
        f"{ATTN}.o_proj": o[:, qs],
        f"{MLP}.gate_up_proj": torch.cat([gate[ms], up[ms]]),
        f"{MLP}.down_proj": down[:, ms],
    }
    for name, value in expect.items():
        got = params[f"{pre}.{name}.weight"]
        assert got.dtype == torch.float32 and torch.equal(got, value), (rank, name)


def _rank_scales(kind: str, scales: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """What a rank of 2 should hold as layer 0's q/k/v and o_proj scale in the common layout
    [ceil(N / bn), ceil(K / bk)] (`fp8.scale_2d`), from the checkpoint's scales (TP_BLOCK)."""
    q, k, v, o = (scales[p] for p in "qkvo")
    if kind == "block":  # q: 2 block rows a rank, k / v: 1; o: 1 of 2 block columns
        qkv = torch.cat([q[2 * rank : 2 * rank + 2], k[rank : rank + 1], v[rank : rank + 1]])
        return {"qkv_proj": qkv, "o_proj": o[:, rank : rank + 1]}
    if kind == "channel":  # rows of the column-parallel layer, all of the row-parallel one
        qkv = torch.cat([q[16 * rank : 16 * rank + 16], k[8 * rank : 8 * rank + 8], v[8 * rank : 8 * rank + 8]])  # fmt: skip
        return {"qkv_proj": qkv, "o_proj": o}
    rows = [q.reshape(1, 1).expand(16, 1), k.reshape(1, 1).expand(8, 1), v.reshape(1, 1).expand(8, 1)]  # fmt: skip
    return {"qkv_proj": torch.cat(rows), "o_proj": o.reshape(1, 1)}


@pytest.mark.parametrize("fmt", ["fp8-tensor", "fp8-block", "ct-channel"])
def test_each_rank_keeps_its_fp8_bytes_and_scales(fmt, packed, monkeypatch):
    """What a CUDA rank keeps for the FP8 GEMM (the weight and scale handed to `_finish`
    before the CPU dequantizes them) is exactly its slice of the checkpoint's FP8 bytes and
    scales."""
    from splitserve.worker.quantization import fp8

    folder, _ = packed("llama", fmt)
    ckpt = load_file(folder / "model.safetensors")
    kind, scale_name = FORMATS[fmt][1], FORMATS[fmt][2]
    pre = f"model.layers.0.{ATTN}"
    scales = {p: ckpt[f"{pre}.{p}_proj.{scale_name}"] for p in "qkvo"}
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    finish = fp8._finish

    def record(layer, weight, scale, block):
        kept[id(layer)] = (weight.clone(), scale.clone())
        return finish(layer, weight, scale, block)

    monkeypatch.setattr(fp8, "_finish", record)
    q, k, v, o = (ckpt[f"{pre}.{p}_proj.weight"].view(torch.uint8) for p in "qkvo")
    for rank in range(2):
        kept.clear()
        config = WorkerConfig(model=str(folder), tensor_parallel_size=2, tp_rank=rank)
        attn = load_model(config).model.model.layers[0].self_attn
        qs, ks = slice(16 * rank, 16 * rank + 16), slice(8 * rank, 8 * rank + 8)
        weights = {"qkv_proj": torch.cat([q[qs], k[ks], v[ks]]), "o_proj": o[:, qs]}
        for name, expected_scale in _rank_scales(kind, scales, rank).items():
            weight, scale = kept[id(getattr(attn, name))]
            assert torch.equal(weight.view(torch.uint8), weights[name]), (rank, name)
            assert torch.equal(scale, expected_scale.float()), (rank, name)


# NOTE: on CPU every FP8 layout is dequantized at load and runs the unquantized linear path
# (fp8._finish), so past loading these grids run the same code whatever the format. What differs
# per format is loading: every format's per-rank slices on Llama are checked above (and each
# P=2 x T=2 rank's below); these grids add what only other architectures load: q/k/v biases
# beside FP8 scales (Qwen2) and q/k norms (Qwen3).
@pytest.mark.parametrize(
    "arch, fmt",
    [
        ("qwen2", "ct-static"),  # q/k/v biases sliced beside per-tensor and input scales
        ("qwen3", "ct-block"),  # q/k norms over each rank's heads
    ],
)
def test_tp2_fp8_matches_one_rank_and_transformers(arch, fmt, packed, tmp_path):
    folder, dense_folder = packed(arch, fmt)
    workload = _workload(96)[:8]
    grid = GridWorkers(folder, 1, 2, tmp_path, 60)
    try:
        one = _one_rank(folder, workload)
        assert one == _transformers_greedy(dense_folder, workload)
        got = grid.generate(workload)
        assert got == one, f"{arch} {fmt}: TP=2 differs from one rank"
    finally:
        grid.kill()


def test_each_pp2_by_tp2_rank_holds_only_its_layers_fp8_slices(packed, monkeypatch):
    """Two stages of one layer each, two ranks a stage: each of the four ranks reads FP8
    tensors of its own layer only and holds exactly its slices of them. (On CPU the FP8
    weights are dequantized at load, so past loading a P=2 x T=2 grid runs the unquantized
    code, which test_tensor_parallel's PP=2 x TP=2 Llama grid runs end to end.)"""
    folder, dense_folder = packed("llama", "fp8-block")
    dense = load_file(dense_folder / "model.safetensors")
    read = spy_reads(monkeypatch, "materialize", "narrow")
    for stage in range(2):
        for rank in range(2):
            read.clear()
            config = WorkerConfig(
                model=str(folder),
                rank=stage,
                pipeline_parallel_size=2,
                tensor_parallel_size=2,
                tp_rank=rank,
            )
            loaded = load_model(config)
            assert (loaded.start_layer, loaded.end_layer) == (stage, stage + 1)
            layers = {n.split(".")[2] for n in read if n.startswith("model.layers.")}
            assert layers == {str(stage)}, (stage, rank, sorted(read))
            assert any(n.endswith("weight_scale_inv") for n in read), sorted(read)
            _assert_rank_slices(loaded.model.state_dict(), dense, stage, rank)


@pytest.mark.parametrize(
    "block, message",
    [
        # k / v: 1 KV head of 8 rows a rank, half a 16-row block.
        ((16, 16), r"gives this rank 8 output rows of shard 'k', not a whole number of 16-row"),
        # o_proj: 16 of 32 input features a rank, not a whole number of 24-column blocks.
        ((8, 24), r"gives each of 2 ranks 16 of the 32 input features, not a whole number of 24"),
    ],
)
def test_a_block_scale_that_slices_mid_block_is_refused(block, message, packed):
    folder, _ = packed("llama", "fp8-block", block)
    check_model(WorkerConfig(model=str(folder)))  # one rank: the same checkpoint loads
    with pytest.raises(ValueError, match=message):
        check_model(WorkerConfig(model=str(folder), tensor_parallel_size=2))


@pytest.mark.parametrize("extra", [{}, {"enable_expert_parallel": True}], ids=["tp", "ep"])
def test_fp8_moe_experts_load_under_tensor_and_expert_parallelism(extra, checkpoint, tmp_path):
    """Each rank's experts (a slice of every expert under TP, whole ones under EP) hold exactly
    the one-rank model's dequantized experts there (tests/worker/test_tensor_parallel_quant_moe.py
    checks slices, bytes, scales and tokens in depth)."""
    source = checkpoint(
        "qwen3_moe_tp_fp8",
        arch="qwen3_moe",
        num_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        mlp_only_layers=[1],
    )
    folder, dense_folder = pack_checkpoint(source, tmp_path / "moe-fp8", "fp8-block", TP_BLOCK)
    dense = load_file(dense_folder / "model.safetensors")
    pre = "model.layers.0.mlp.experts"
    config = WorkerConfig(model=str(folder), tensor_parallel_size=2, tp_rank=1, **extra)
    experts = load_model(config).model.model.layers[0].mlp.experts
    for slot, e in enumerate(experts.slot_experts):
        gate, up, down = (dense[f"{pre}.{e}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        if not extra:  # rank 1 of 2: intermediate features 16..31 of every expert
            gate, up, down = gate[16:], up[16:], down[:, 16:]
        assert torch.equal(experts.gate_up_proj[slot], torch.cat([gate, up])), slot
        assert torch.equal(experts.down_proj[slot], down), slot
    assert experts.slot_experts == ([2, 3] if extra else [0, 1, 2, 3])


def test_online_fp8_stays_refused_with_its_reason(checkpoint, tmp_path):
    """`--quantization fp8` at load stays refused; int4 checkpoints load under tensor
    parallelism now (tests/worker/test_tensor_parallel_int4.py)."""
    from splitserve.testing import int4_pack

    source = checkpoint("llama_tp_fp8", arch="llama", num_layers=LAYERS)
    with pytest.raises(ValueError, match="scale from its whole row, which a row-parallel rank"):
        check_model(WorkerConfig(model=str(source), tensor_parallel_size=2, quantization="fp8"))
    folder, _ = int4_pack.pack_checkpoint(source, tmp_path / "awq", "awq", 16)
    check_model(WorkerConfig(model=str(folder), tensor_parallel_size=2))
