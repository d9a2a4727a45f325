"""Int4 checkpoints on CPU: AWQ (AutoAWQ GEMM layout) and compressed-tensors W4A16
(`pack-quantized`) packed here from tiny random models; AWQ's nibble order checked against a
plain reference of the documented order, the compressed-tensors layout against the
compressed-tensors package itself; the model's greedy tokens and logprobs equal to transformers
on the dequantized weights (fp32). Plus the start-up errors of a bad int4 checkpoint."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from splitserve.testing.demo_model import build_model
from splitserve.testing.int4_pack import (
    AWQ_ORDER,
    LINEAR_RE,
    ct_scheme,
    pack_awq,
    pack_checkpoint,
    pack_ct,
    pack_words,
    quantize,
)
from splitserve.worker.config import WorkerConfig
from splitserve.worker.linear import Linear
from splitserve.worker.model_loader import check_model, load_model
from splitserve.worker.quantization.awq import AwqLinearMethod
from splitserve.worker.quantization.int4 import unpack_int32

from .test_quantization import _assert_parity, _both, _edited
from .test_weight_loading import PROMPT
from .utils import model_forward


@pytest.fixture(scope="module")
def qwen2(checkpoint):
    """hidden 32, intermediate 64, q/k/v biases: group 32 fits every projection."""
    return checkpoint("qwen2_int4", arch="qwen2")


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """hidden 64, intermediate 128: group 64 fits every projection."""
    root = tmp_path_factory.mktemp("int4")
    return build_model(root / "llama64", vocab_size=96, num_layers=2, max_position_embeddings=256)


def _fused_qkv_equals_dense(model, dense_folder):
    dense = load_file(dense_folder / "model.safetensors")
    qkv = model.model.layers[1].self_attn.qkv_proj
    expected = torch.cat([dense[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv.state_dict()["weight"], expected)
    gate_up = model.model.layers[0].mlp.gate_up_proj.state_dict()["weight"]
    expected = torch.cat([dense[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(gate_up, expected)
    assert model.lm_head.weight.dtype == torch.float32  # lm_head stays unquantized


@pytest.mark.parametrize("model,group", [("qwen2", 32), ("llama64", 64)])
def test_awq_matches_transformers_on_dequantized_weights(model, group, request, tmp_path):
    src = request.getfixturevalue(model)
    folder, dense_folder = pack_checkpoint(src, tmp_path / "awq", "awq", group)
    assert "model.layers.0.self_attn.k_proj.qzeros" in load_file(folder / "model.safetensors")
    loaded = load_model(WorkerConfig(model=str(folder), quantization="awq")).model
    _fused_qkv_equals_dense(loaded, dense_folder)
    _assert_parity(loaded, dense_folder)


def test_awq_group_128_layer(tmp_path):
    """A group of 128 (the common AutoAWQ setting) on one 128-wide layer, loaded through its
    parameters' weight loaders."""
    torch.manual_seed(0)
    w = torch.randn(24, 256) * 0.1
    tensors, dense = pack_awq(w, 128)
    layer = Linear(256, 24, bias=False, method=AwqLinearMethod(128))
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor)
    layer.process_weights_after_loading()
    assert torch.equal(layer.state_dict()["weight"], dense)
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ dense.t(), atol=1e-5, rtol=1e-5)


def _documented_awq_word(columns: list[int]) -> int:
    """A word of 8 column values in AutoAWQ's documented order, read as a hex string: its
    least significant digit is column 0, then columns 2, 4, 6, 1, 3, 5, 7."""
    digits = [f"{columns[c]:x}" for c in (0, 2, 4, 6, 1, 3, 5, 7)]
    return int("".join(reversed(digits)), 16)


def test_awq_nibble_order_is_autoawqs():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=(5, 24))  # [K, N]
    ours = pack_words(q, AWQ_ORDER)
    expected = np.array(
        [[_documented_awq_word(list(q[r, 8 * c : 8 * c + 8])) for c in range(3)] for r in range(5)],
        dtype=np.uint32,
    ).view(np.int32)
    assert np.array_equal(ours, expected)
    naive = pack_words(q, tuple(range(8)))
    assert not np.array_equal(naive, expected)  # the order matters: this test can fail
    # The worker unpacks the documented order back to the columns, and a naive-order
    # checkpoint to something else.
    worker = unpack_int32(torch.from_numpy(ours), AWQ_ORDER)
    assert np.array_equal(worker.numpy(), q)
    assert not np.array_equal(unpack_int32(torch.from_numpy(naive), AWQ_ORDER).numpy(), q)


@pytest.mark.parametrize("fmt", ["awq", "w4a16-asym"])
def test_cuda_layout_on_cpu(fmt, qwen2, tmp_path, monkeypatch):
    """The repacked layout the GPU keeps (int4 along K, scales and zeros [G, N]) computes the
    dequantized model: through the torch reference of the packed GEMM for the whole model, and
    through the Triton kernel (interpreter) for one fused layer."""
    from splitserve.kernels import dispatch
    from splitserve.worker.quantization import int4

    folder, dense_folder = pack_checkpoint(qwen2, tmp_path / fmt, fmt)
    monkeypatch.setattr(int4, "keeps_packed", lambda t: True)
    model = load_model(WorkerConfig(model=str(folder))).model
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert not hasattr(qkv, "weight") and qkv.int4_qweight.shape == (32 // 8, 64)
    _assert_parity(model, dense_folder)
    dense = load_file(dense_folder / "model.safetensors")
    w = torch.cat([dense[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    x = torch.randn(5, 32)
    out = dispatch.w4a16_linear(
        x, qkv.int4_qweight, qkv.int4_scales, qkv.int4_zeros, qkv.int4_group, qkv.bias,
        backend="triton",
    )  # fmt: skip
    torch.testing.assert_close(out, x @ w.t() + qkv.bias, atol=1e-4, rtol=1e-4)


def test_awq_dummy_weights_load(qwen2, tmp_path):
    folder, _ = pack_checkpoint(qwen2, tmp_path / "awq", "awq")
    model = load_model(WorkerConfig(model=str(folder), load_format="dummy")).model
    assert torch.isfinite(model_forward(model, PROMPT)).all()


CT_FORMATS = {"w4a16": (32, True), "w4a16-asym": (32, False), "w4a16-channel": (None, True)}


@pytest.mark.parametrize("fmt", list(CT_FORMATS))
def test_w4a16_matches_transformers_on_dequantized_weights(fmt, qwen2, tmp_path):
    folder, dense_folder = pack_checkpoint(qwen2, tmp_path / fmt, fmt)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    loaded = load_model(WorkerConfig(model=str(folder), quantization="compressed-tensors")).model
    _fused_qkv_equals_dense(loaded, dense_folder)
    _assert_parity(loaded, dense_folder)


@pytest.mark.parametrize("fmt", list(CT_FORMATS))
def test_compressed_tensors_is_the_oracle_of_pack_quantized(fmt, qwen2):
    """compressed-tensors' own compressor packs the same int32 words (weights and zero points)
    from the dequantized weights and the packer's scales, and unpacks ours to the same
    weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    group, symmetric = CT_FORMATS[fmt]
    scheme = ct_scheme(group, symmetric)
    state = load_file(qwen2 / "model.safetensors")
    for key, w in state.items():
        if not LINEAR_RE.match(key):
            continue
        ours, dense = pack_ct(w, group, symmetric)
        _, zeros, scales = quantize(w, group or w.shape[1], symmetric, torch.bfloat16)
        given = {"weight": dense, "weight_scale": scales.float()}
        if not symmetric:
            given["weight_zero_point"] = (zeros - 8).to(torch.int8)
        theirs = PackedQuantizationCompressor.compress(given, scheme)
        for name in ("weight_packed", "weight_zero_point", "weight_shape"):
            if name in ours or name in theirs:
                assert torch.equal(theirs[name], ours[name]), (key, name)
        back = PackedQuantizationCompressor.decompress(
            dict(ours, weight_scale=ours["weight_scale"].float()), scheme
        )
        torch.testing.assert_close(back["weight"], dense, atol=0, rtol=0)


# --- bad input: start-up errors naming the problem ------------------------------------------


@pytest.fixture(scope="module")
def awq32(qwen2, tmp_path_factory):
    return pack_checkpoint(qwen2, tmp_path_factory.mktemp("awq") / "awq", "awq")[0]


def test_awq_group_size_that_does_not_divide_the_input_dim(awq32, tmp_path):
    def group(config):
        config["quantization_config"]["group_size"] = 24

    _both(
        _edited(awq32, tmp_path / "g", config_edit=group),
        r"layer model\.layers\.0\.self_attn\.qkv_proj: group_size 24 does not divide the input "
        r"dim 32 of the layer",
    )


@pytest.mark.parametrize(
    "tensor,shape,message",
    [
        (
            "model.layers.0.self_attn.k_proj.scales",
            (1, 24),
            r"checkpoint tensor model\.layers\.0\.self_attn\.k_proj\.scales: shard 'k' scales has "
            r"shape \(1, 24\), expected \(1, 16\)",
        ),
        (
            "model.layers.1.mlp.down_proj.qweight",
            (64, 3),
            r"checkpoint tensor model\.layers\.1\.mlp\.down_proj\.qweight has shape \(64, 3\), "
            r"the model expects \(64, 4\)",
        ),
    ],
)
def test_awq_corrupt_tensor_is_named(awq32, tmp_path, tensor, shape, message):
    def bad(state):
        state[tensor] = torch.ones(shape, dtype=state[tensor].dtype)

    _both(_edited(awq32, tmp_path / "bad", state_edit=bad), message)


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"bits": 8}, r"quantization_config\.bits 8: AWQ checkpoints of 4 bits only"),
        ({"version": "gemv"}, r"quantization_config\.version 'gemv'"),
        ({"zero_point": False}, r"AWQ without zero points is not supported"),
    ],
)
def test_awq_unsupported_config(awq32, tmp_path, edit, message):
    _both(
        _edited(awq32, tmp_path / "c", config_edit=lambda c: c["quantization_config"].update(edit)),
        message,
    )


def test_awq_non_finite_scale_is_refused_at_load(awq32, tmp_path):
    def nan(state):
        state["model.layers.1.self_attn.o_proj.scales"][0, 3] = float("nan")

    folder = _edited(awq32, tmp_path / "nan", state_edit=nan)
    check_model(WorkerConfig(model=str(folder)))  # headers only: shapes are right
    with pytest.raises(ValueError, match="its int4 scales hold non-finite values"):
        load_model(WorkerConfig(model=str(folder)))


MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1]
    ),
}


@pytest.mark.parametrize("arch,fmt", [("mixtral", "awq"), ("qwen3_moe", "w4a16-asym")])
def test_int4_moe_experts_match_transformers(arch, fmt, checkpoint, tmp_path):
    src = checkpoint(f"{arch}_int4", arch=arch, num_layers=2, **MOE[arch])
    folder, dense_folder = pack_checkpoint(src, tmp_path / fmt, fmt)
    names = load_file(folder / "model.safetensors").keys()
    assert any(".experts.3." in n and n.endswith(("qzeros", "weight_zero_point")) for n in names)
    model = load_model(WorkerConfig(model=str(folder))).model
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32
    dense = load_file(dense_folder / "model.safetensors")
    gate, up = ("w1", "w3") if arch == "mixtral" else ("gate_proj", "up_proj")
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    expected = torch.cat([dense[f"model.layers.0.{moe}.experts.2.{p}.weight"] for p in (gate, up)])
    assert torch.equal(experts.gate_up_proj[2], expected)
    _assert_parity(model, dense_folder)


def test_corrupt_int4_expert_tensor_is_named(checkpoint, tmp_path):
    src = checkpoint("mixtral_int4", arch="mixtral", num_layers=2, **MOE["mixtral"])
    folder, _ = pack_checkpoint(src, tmp_path / "awq", "awq")
    name = "model.layers.1.block_sparse_moe.experts.2.w3.qzeros"

    def bad(state):
        state[name] = torch.ones(1, 16, dtype=torch.int32)

    _both(
        _edited(folder, tmp_path / "bad", state_edit=bad),
        rf"checkpoint tensor {re.escape(name)}: expert 2 'w3' qzeros has shape \(1, 16\), "
        r"expected \(1, 8\)",
    )


def test_unquantized_model_refuses_the_awq_flag(qwen2):
    with pytest.raises(ValueError, match="--quantization awq needs a checkpoint saved in that"):
        check_model(WorkerConfig(model=str(qwen2), quantization="awq"))


@pytest.fixture(scope="module")
def ct_asym(qwen2, tmp_path_factory):
    return pack_checkpoint(qwen2, tmp_path_factory.mktemp("ct") / "ct", "w4a16-asym")[0]


def _ct_weights(config):
    return config["quantization_config"]["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda c: _ct_weights(c).update(num_bits=8),
            r"pack-quantized with 8-bit int weights is not supported; splitserve loads 4-bit",
        ),
        (
            lambda c: _ct_weights(c).update(group_size=48),
            r"layer model\.layers\.0\.self_attn\.qkv_proj: group_size 48 does not divide the "
            r"input dim 32",
        ),
        (
            lambda c: _ct_weights(c).update(actorder="group"),
            r"actorder 'group' .* is not supported",
        ),
    ],
)
def test_w4a16_unsupported_config(ct_asym, tmp_path, edit, message):
    _both(_edited(ct_asym, tmp_path / "c", config_edit=edit), message)


@pytest.mark.parametrize(
    "tensor,shape,message",
    [
        (
            "model.layers.0.mlp.gate_proj.weight_scale",
            (64, 2),
            r"checkpoint tensor model\.layers\.0\.mlp\.gate_proj\.weight_scale: shard 'gate' "
            r"weight_scale has shape \(64, 2\), expected \(64, 1\)",
        ),
        (
            "model.layers.1.self_attn.o_proj.weight_packed",
            (32, 8),
            r"checkpoint tensor model\.layers\.1\.self_attn\.o_proj\.weight_packed has shape "
            r"\(32, 8\), the model expects \(32, 4\)",
        ),
        (
            "model.layers.1.self_attn.v_proj.weight_zero_point",
            (1, 1),
            r"checkpoint tensor model\.layers\.1\.self_attn\.v_proj\.weight_zero_point: shard "
            r"'v' weight_zero_point has shape \(1, 1\), expected \(2, 1\)",
        ),
    ],
)
def test_w4a16_corrupt_tensor_is_named(ct_asym, tmp_path, tensor, shape, message):
    def bad(state):
        state[tensor] = torch.ones(shape, dtype=state[tensor].dtype)

    _both(_edited(ct_asym, tmp_path / "bad", state_edit=bad), message)


def test_w4a16_weight_shape_is_checked_at_load(ct_asym, tmp_path):
    def wrong(state):
        state["model.layers.0.self_attn.k_proj.weight_shape"] = torch.tensor([16, 24])

    folder = _edited(ct_asym, tmp_path / "shape", state_edit=wrong)
    with pytest.raises(
        ValueError, match=r"shard 'k' weight_shape says \[16, 24\], the model expects \[16, 32\]"
    ):
        load_model(WorkerConfig(model=str(folder)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["awq", "w4a16-asym"])
def test_int4_on_cuda_keeps_int4_and_runs_the_kernel(fmt, qwen2, tmp_path):
    """On CUDA the layers hold the repacked int4 weight and compute through the W4A16 GEMM:
    a fused projection equals the dequantized weights' (fp16 output rounding)."""
    folder, dense_folder = pack_checkpoint(qwen2, tmp_path / fmt, fmt)
    model = load_model(WorkerConfig(model=str(folder), device="cuda", dtype="float16")).model
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert not qkv.int4_dense and qkv.int4_qweight.is_cuda and not hasattr(qkv, "weight")
    dense = load_file(dense_folder / "model.safetensors")
    w = torch.cat([dense[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]).cuda()
    for m in (1, 7, 40):
        x = torch.randn(m, 32, device="cuda", dtype=torch.float16)
        expected = x.float() @ w.t() + qkv.bias.float()
        torch.testing.assert_close(qkv(x).float(), expected, atol=2e-2, rtol=1e-2)
