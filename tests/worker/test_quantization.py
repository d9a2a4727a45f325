"""FP8 checkpoints on CPU: each format packed here from a tiny random Llama, cross-checked by an
independent dequantization (compressed-tensors for its own format, plain loops otherwise), and
the model's greedy tokens and logprobs equal to transformers on the dequantized weights (fp32).
Plus the start-up errors of a bad quantized checkpoint."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.testing.fp8_pack import (
    FORMATS,
    LINEAR_RE,
    ct_scheme,
    dequant,
    pack,
    pack_checkpoint,
)
from splitserve.worker.config import QUANTIZATION_METHODS, WorkerConfig
from splitserve.worker.model_loader import check_model, load_model
from splitserve.worker.quantization import _registry

from .test_weight_loading import PROMPT, greedy, hf_greedy
from .utils import hf_logits, model_forward


@pytest.fixture(scope="module")
def source(checkpoint):
    return checkpoint("llama_fp8", arch="llama")


@pytest.fixture(scope="module")
def packed(source, tmp_path_factory):
    """format -> (quantized folder, dequantized folder), built once."""
    root = tmp_path_factory.mktemp("fp8")
    return {fmt: pack_checkpoint(source, root / fmt, fmt) for fmt in FORMATS}


def _write(src, out, state):
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(state, out / "model.safetensors")
    return out


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _assert_parity(model, dense_folder):
    assert greedy(model) == hf_greedy(dense_folder)
    ids = PROMPT + [7, 11, 13, 17]
    torch.testing.assert_close(
        _logprobs(model_forward(model, ids)), _logprobs(hf_logits(dense_folder, ids)),
        atol=1e-3, rtol=0,
    )  # fmt: skip


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fp8_format_matches_transformers_on_dequantized_weights(fmt, packed):
    folder, dense_folder = packed[fmt]
    loaded = load_model(WorkerConfig(model=str(folder)))
    model = loaded.model
    # The worker dequantized exactly what the test's own dequantizer did.
    dense = load_file(dense_folder / "model.safetensors")
    qkv = model.model.layers[1].self_attn.qkv_proj
    expected = torch.cat([dense[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv.state_dict()["weight"], expected)
    down = model.model.layers[2].mlp.down_proj.state_dict()["weight"]
    assert torch.equal(down, dense["model.layers.2.mlp.down_proj.weight"])
    assert model.lm_head.weight.dtype == torch.float32  # lm_head stays unquantized
    _assert_parity(model, dense_folder)


@pytest.mark.parametrize("kind", ["channel", "block"])
def test_compressed_tensors_is_the_oracle_of_its_format(kind, source):
    """compressed-tensors' own compressor packs the same FP8 bytes from the test's scales and
    unpacks them to the same weights."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor

    scheme = ct_scheme(kind)
    state = load_file(source / "model.safetensors")
    for key, w in state.items():
        if not LINEAR_RE.match(key):
            continue
        q, scale = pack(w, kind)
        theirs = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
        assert torch.equal(theirs["weight"].view(torch.uint8), q.view(torch.uint8)), key
        back = FloatQuantizationCompressor.decompress({"weight": q, "weight_scale": scale}, scheme)
        torch.testing.assert_close(back["weight"].float(), dequant(q, scale, kind), atol=0, rtol=0)


def test_fbgemm_activation_scale_ub_reaches_the_layers(packed):
    """The cap the GPU's W8A8 path applies to each token's absmax comes from the config."""
    model = load_model(WorkerConfig(model=str(packed["fbgemm_fp8"][0]))).model
    assert model.model.layers[0].self_attn.o_proj.fp8_activation_scale_ub == 1200.0
    assert model.model.layers[1].mlp.gate_up_proj.fp8_activation_scale_ub == 1200.0
    block = load_model(WorkerConfig(model=str(packed["fp8-block"][0]))).model
    assert block.model.layers[0].self_attn.o_proj.fp8_activation_scale_ub is None


def test_quantization_fp8_on_an_unquantized_model(source, tmp_path):
    """--quantization fp8 quantizes each layer per output channel at load."""
    state = load_file(source / "model.safetensors")
    dense = {
        k: dequant(*pack(w, "channel"), "channel") if LINEAR_RE.match(k) else w
        for k, w in state.items()
    }
    dense_folder = _write(source, tmp_path / "dense", dense)
    model = load_model(WorkerConfig(model=str(source), quantization="fp8")).model
    o_proj = model.model.layers[0].self_attn.o_proj.state_dict()["weight"]
    assert torch.equal(o_proj, dense["model.layers.0.self_attn.o_proj.weight"])
    assert not torch.equal(o_proj, state["model.layers.0.self_attn.o_proj.weight"])
    _assert_parity(model, dense_folder)


def test_flag_confirms_the_checkpoint_format(packed):
    folder, _ = packed["fp8-block"]
    check_model(WorkerConfig(model=str(folder), quantization="fp8"))
    with pytest.raises(
        ValueError,
        match=r"--quantization fbgemm_fp8 does not match the checkpoint, whose config\.json "
        r"quantization_config says quant_method 'fp8'",
    ):
        check_model(WorkerConfig(model=str(folder), quantization="fbgemm_fp8"))


def test_registry_lists_the_config_choices():
    assert tuple(_registry()) == QUANTIZATION_METHODS
    with pytest.raises(
        ValueError,
        match="quantization must be one of fp8, fbgemm_fp8, compressed-tensors, awq, mxfp4",
    ):
        WorkerConfig(model="x", quantization="gptq")


# --- bad input: start-up errors naming the problem ------------------------------------------


def _edited(src, out, config_edit=None, state_edit=None):
    shutil.copytree(src, out)
    if config_edit is not None:
        config = json.loads((out / "config.json").read_text())
        config_edit(config)
        (out / "config.json").write_text(json.dumps(config))
    if state_edit is not None:
        state = load_file(out / "model.safetensors")
        state_edit(state)
        save_file(state, out / "model.safetensors")
    return out


def _both(folder, message):
    for fn in (check_model, load_model):
        with pytest.raises(ValueError, match=message):
            fn(WorkerConfig(model=str(folder)))


def test_corrupt_scale_tensor_is_named(packed, tmp_path):
    def fused(state):
        state["model.layers.0.self_attn.k_proj.weight_scale_inv"] = torch.ones(3, 2)

    _both(
        _edited(packed["fp8-block"][0], tmp_path / "a", state_edit=fused),
        r"checkpoint tensor model\.layers\.0\.self_attn\.k_proj\.weight_scale_inv: shard 'k' "
        r"weight_scale_inv has shape \(3, 2\), expected \(1, 2\)",
    )

    def plain(state):
        state["model.layers.1.self_attn.o_proj.weight_scale"] = torch.ones(16, 1)

    _both(
        _edited(packed["fbgemm_fp8"][0], tmp_path / "b", state_edit=plain),
        r"checkpoint tensor model\.layers\.1\.self_attn\.o_proj\.weight_scale has shape "
        r"\(16, 1\), the model expects \(32, 1\)",
    )


def test_non_finite_scale_is_refused_at_load(packed, tmp_path):
    def nan(state):
        state["model.layers.2.mlp.down_proj.weight_scale"][3] = float("nan")

    folder = _edited(packed["ct-channel"][0], tmp_path / "nan", state_edit=nan)
    with pytest.raises(ValueError, match="its FP8 scale holds non-finite values"):
        load_model(WorkerConfig(model=str(folder)))


def test_block_size_that_does_not_divide_a_shard(packed, tmp_path):
    def blocks(config):
        config["quantization_config"]["weight_block_size"] = [24, 24]

    _both(
        _edited(packed["fp8-block"][0], tmp_path / "b", config_edit=blocks),
        r"layer model\.layers\.0\.self_attn\.qkv_proj: weight_block_size \[24, 24\] does not "
        r"divide shard 'q': its 32 output rows are not a multiple of 24",
    )


def test_unknown_quant_method_names_the_supported_ones(packed, tmp_path):
    def gptq(config):
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}

    _both(
        _edited(packed["fp8-tensor"][0], tmp_path / "g", config_edit=gptq),
        r"quant_method 'gptq', which splitserve does not load; supported: fp8, fbgemm_fp8, "
        r"compressed-tensors",
    )


def test_unsupported_compressed_tensors_scheme(packed, tmp_path):
    def int4(config):
        config["quantization_config"]["format"] = "marlin-24"
        weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
        weights.update(type="int", num_bits=4)

    _both(
        _edited(packed["ct-channel"][0], tmp_path / "i", config_edit=int4),
        r"format 'marlin-24' with 4-bit int weights is not supported; splitserve loads the FP8 "
        r"schemes",
    )


def test_dummy_weights_load_in_every_format(packed):
    for fmt in ("fp8-tensor", "fp8-block"):
        model = load_model(WorkerConfig(model=str(packed[fmt][0]), load_format="dummy")).model
        assert torch.isfinite(model_forward(model, PROMPT)).all()


MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[1]
    ),
}


@pytest.mark.parametrize(
    "arch,fmt", [("mixtral", "fbgemm_fp8"), ("qwen3_moe", "fp8-block"), ("qwen3_moe", "fp8-tensor")]
)
def test_fp8_moe_experts_match_transformers(arch, fmt, checkpoint, tmp_path):
    src = checkpoint(f"{arch}_fp8", arch=arch, num_layers=2, **MOE[arch])
    folder, dense_folder = pack_checkpoint(src, tmp_path / fmt, fmt, block=(8, 16))
    names = load_file(folder / "model.safetensors").keys()
    assert any(
        ".experts.3." in n and n.endswith(("weight_scale", "weight_scale_inv")) for n in names
    )
    model = load_model(WorkerConfig(model=str(folder))).model
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32
    dense = load_file(dense_folder / "model.safetensors")
    gate, up = ("w1", "w3") if arch == "mixtral" else ("gate_proj", "up_proj")
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    expected = torch.cat([dense[f"model.layers.0.{moe}.experts.2.{p}.weight"] for p in (gate, up)])
    assert torch.equal(experts.gate_up_proj[2], expected)
    _assert_parity(model, dense_folder)


def test_quantization_fp8_on_unquantized_moe_experts(checkpoint, caplog):
    src = checkpoint("qwen3_moe_fp8", arch="qwen3_moe", num_layers=2, **MOE["qwen3_moe"])
    with caplog.at_level("WARNING", logger="splitserve.worker.quantization"):
        model = load_model(WorkerConfig(model=str(src), quantization="fp8")).model
    # The routers stay in full precision on purpose: not reported as left unquantized.
    assert "stay unquantized" not in caplog.text
    assert isinstance(model.model.layers[0].mlp.gate, torch.nn.Linear)
    state = load_file(src / "model.safetensors")
    w = state["model.layers.0.mlp.experts.1.down_proj.weight"]
    assert torch.equal(
        model.model.layers[0].mlp.experts.down_proj[1], dequant(*pack(w, "channel"), "channel")
    )


def test_block_size_that_splits_the_experts_gate_and_up(checkpoint, tmp_path):
    src = checkpoint("qwen3_moe_fp8", arch="qwen3_moe", num_layers=2, **MOE["qwen3_moe"])
    folder, _ = pack_checkpoint(src, tmp_path / "b", "fp8-block", block=(16, 16))
    _both(
        folder,
        r"layer model\.layers\.0\.mlp\.experts: weight_block_size \[16, 16\] does not divide "
        r"the experts' intermediate size 24",
    )


def test_corrupt_expert_scale_is_named(checkpoint, tmp_path):
    src = checkpoint("qwen3_moe_fp8", arch="qwen3_moe", num_layers=2, **MOE["qwen3_moe"])
    folder, _ = pack_checkpoint(src, tmp_path / "c", "fbgemm_fp8")
    name = "model.layers.0.mlp.experts.3.up_proj.weight_scale"

    def bad(state):
        state[name] = torch.ones(23, 1)

    _both(
        _edited(folder, tmp_path / "bad", state_edit=bad),
        rf"checkpoint tensor {re.escape(name)}: expert 3 'up_proj' weight_scale has shape "
        r"\(23, 1\), expected \(24, 1\)",
    )


@pytest.mark.parametrize("fmt", ["fp8-tensor", "ct-static"])
def test_static_input_scales_reach_the_layers(fmt, packed, tmp_path):
    """activation_scheme static: each layer keeps the checkpoint's input_scale for the GPU's
    W8A8 path; a fused layer takes the maximum of its shards' scales."""
    scales = {"q": 0.02, "k": 0.07, "v": 0.03, "gate": 0.01, "up": 0.04}

    def calibrated(state):
        for proj, value in scales.items():
            part = "self_attn" if proj in "qkv" else "mlp"
            state[f"model.layers.1.{part}.{proj}_proj.input_scale"] = torch.tensor([value])

    folder = _edited(packed[fmt][0], tmp_path / fmt, state_edit=calibrated)
    layers = load_model(WorkerConfig(model=str(folder))).model.model.layers
    assert float(layers[1].self_attn.qkv_proj.fp8_input_scale) == pytest.approx(0.07)
    assert float(layers[1].mlp.gate_up_proj.fp8_input_scale) == pytest.approx(0.04)
    assert float(layers[0].self_attn.o_proj.fp8_input_scale) == pytest.approx(0.05)
    dynamic = load_model(WorkerConfig(model=str(packed["ct-channel"][0]))).model
    assert getattr(dynamic.model.layers[0].self_attn.o_proj, "fp8_input_scale", None) is None


def test_static_input_scale_is_required_and_checked(packed, tmp_path):
    name = "model.layers.0.self_attn.o_proj.input_scale"

    def missing(state):
        del state[name]

    _both(_edited(packed["fp8-tensor"][0], tmp_path / "m", state_edit=missing), re.escape(name))

    def zero(state):
        state[name] = torch.tensor(0.0)

    with pytest.raises(ValueError, match=r"input_scale must be finite and non-zero, got \[0\.0\]"):
        load_model(
            WorkerConfig(
                model=str(_edited(packed["fp8-tensor"][0], tmp_path / "n", state_edit=zero))
            )
        )


def test_compressed_tensors_activation_schemes(packed, tmp_path):
    """No input_activations: FP8 weight-only (W8A16 on every GPU); int8 or static per-token
    activations are refused by name; static block-wise fp8 is refused."""

    def weight_only(config):
        config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None

    model = load_model(
        WorkerConfig(model=str(_edited(packed["ct-channel"][0], tmp_path / "w", weight_only)))
    ).model
    assert model.model.layers[0].self_attn.o_proj.fp8_weight_only is True

    def int8(config):
        config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
            "num_bits": 8, "type": "int", "strategy": "token", "dynamic": True,
        }  # fmt: skip

    _both(
        _edited(packed["ct-channel"][0], tmp_path / "i", int8),
        r"input_activations of 8-bit int \(symmetric\) are not supported",
    )

    def static_token(config):
        acts = config["quantization_config"]["config_groups"]["group_0"]["input_activations"]
        acts.update(dynamic=False, strategy="token")

    _both(
        _edited(packed["ct-channel"][0], tmp_path / "t", static_token),
        r"static input_activations strategy 'token'; supported: tensor",
    )

    def static_block(config):
        config["quantization_config"]["activation_scheme"] = "static"

    _both(
        _edited(packed["fp8-block"][0], tmp_path / "b", static_block),
        r"activation_scheme static with weight_block_size is not supported",
    )
