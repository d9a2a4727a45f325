"""The sparse MoE layer against a naive per-token reference, and MoE checkpoints loading from
per-expert names (what transformers 5 writes) and from stacked ones (its state dict)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_loader import load_model
from splitserve.worker.moe import MIXTRAL_EXPERT_NAMES, QWEN_EXPERT_NAMES, SparseMoE

MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[1]
    ),
}


def _naive_moe(layer: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, as the transformers models define it: softmax over the router logits,
    top-k, optional renormalisation, then the weighted sum of those experts' SwiGLU MLPs."""
    out = torch.zeros_like(x)
    inter = layer.experts.intermediate_size
    for t in range(x.shape[0]):
        probs = F.softmax(layer.gate.weight @ x[t], dim=-1)
        weights, experts = probs.topk(layer.top_k)
        if layer.renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights.tolist(), experts.tolist(), strict=True):
            gate_up = layer.experts.gate_up_proj[e] @ x[t]
            hidden = F.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += w * (layer.experts.down_proj[e] @ hidden)
    return out


def _layer(num_experts: int, top_k: int, renormalize: bool, hidden=16, inter=12) -> SparseMoE:
    torch.manual_seed(0)
    layer = SparseMoE(hidden, num_experts, top_k, inter, renormalize, QWEN_EXPERT_NAMES)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 1), (13, 8, 2), (40, 6, 3)])
def test_layer_matches_naive_per_token_reference(num_tokens, num_experts, top_k, renormalize):
    layer = _layer(num_experts, top_k, renormalize)
    x = torch.randn(num_tokens, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _naive_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_renormalisation_changes_the_output():
    plain, renorm = _layer(6, 2, False), _layer(6, 2, True)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert not torch.allclose(plain(x), renorm(x), atol=1e-3)


def test_an_expert_the_router_never_picks_is_skipped():
    """Expert 3's router row points away from every (positive) input, so no token reaches it;
    its weights are NaN, which any dense all-experts compute would spread."""
    layer = _layer(5, 2, True)
    x = torch.rand(21, 16) + 0.1
    with torch.no_grad():
        layer.gate.weight[3] = -5.0
        expected = _naive_moe(layer, x)
        layer.experts.gate_up_proj[3] = float("nan")
        layer.experts.down_proj[3] = float("nan")
        out = layer(x)
    chosen = layer.gate(x).topk(2, dim=-1).indices
    assert 3 not in chosen.unique().tolist() and len(chosen.unique()) == 4
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_layer_settings_are_refused():
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in \[1, 4\].*got 5"):
        SparseMoE(8, 4, 5, 8, True, MIXTRAL_EXPERT_NAMES)
    with pytest.raises(ValueError, match="unsupported hidden_act 'gelu'"):
        SparseMoE(8, 4, 2, 8, True, MIXTRAL_EXPERT_NAMES, hidden_act="gelu")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_per_expert_and_stacked_checkpoints_load_the_same(arch, checkpoint):
    """transformers 5 writes one tensor per expert (w1/w2/w3 under block_sparse_moe for
    Mixtral); its state dict (`pt` here) holds them stacked under `mlp.experts`."""
    safe = checkpoint(f"{arch}_moe", arch=arch, num_layers=2, **MOE_CONFIGS[arch])
    stacked = checkpoint(f"{arch}_moe_pt", arch=arch, num_layers=2, safe=False, **MOE_CONFIGS[arch])
    names = load_file(safe / "model.safetensors").keys()
    per_expert = "w1" if arch == "mixtral" else "gate_proj"
    assert any(f".experts.3.{per_expert}.weight" in n for n in names)
    pt_names = torch.load(stacked / "pytorch_model.bin", weights_only=True).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in pt_names
    a = load_model(WorkerConfig(model=str(safe))).model.state_dict()
    b = load_model(WorkerConfig(model=str(stacked), load_format="pt")).model.state_dict()
    assert a.keys() == b.keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    if arch == "qwen3_moe":  # layer 1 is dense
        assert "model.layers.1.mlp.gate_up_proj.weight" in a


def _edit(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_expert_tensor_errors_are_named(checkpoint, tmp_path):
    src = checkpoint("mixtral_moe", arch="mixtral", num_layers=2, **MOE_CONFIGS["mixtral"])
    w3 = "model.layers.1.block_sparse_moe.experts.2.w3.weight"

    def shrink(state):
        state[w3] = state[w3][:60]

    def drop(state):
        del state[w3]

    bad = _edit(src, tmp_path / "shape", shrink)
    with pytest.raises(
        ValueError, match=rf"{w3}: expert 2 'w3' weight has shape \(60, 32\), expected \(64, 32\)"
    ):
        load_model(WorkerConfig(model=str(bad)))
    bad = _edit(src, tmp_path / "missing", drop)
    with pytest.raises(
        ValueError, match=r"lacks 1 weights .*model\.layers\.1\.mlp\.experts\.gate_up_proj\[2\.up\]"
    ):
        load_model(WorkerConfig(model=str(bad)))


def _adapter(folder, tensors: dict[str, tuple[int, int]], targets: list[str]):
    """A peft-style adapter folder: rank-2 lora_A/lora_B of the given (out, in) per module."""
    import json

    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    state = {}
    for module, (out, inp) in tensors.items():
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, inp)
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, 2)
    save_file(state, folder / "adapter_model.safetensors")
    return folder


def test_lora_on_moe_experts_is_refused_naming_the_module(checkpoint, tmp_path):
    from splitserve.worker.lora import LoRAManager

    path = checkpoint("qwen3_moe_moe", arch="qwen3_moe", num_layers=2, **MOE_CONFIGS["qwen3_moe"])
    config = WorkerConfig(model=str(path), enable_lora=True, lora_root=str(tmp_path))
    manager = LoRAManager(config, load_model(config).model, "cpu", torch.float32)
    # Attention projections and the dense MLP of layer 1 take adapters.
    good = _adapter(
        tmp_path / "good",
        {
            "model.layers.0.self_attn.q_proj": (32, 32),
            "model.layers.1.mlp.gate_proj": (64, 32),
        },
        ["q_proj", "gate_proj"],
    )
    assert manager.add_request("r1", "good", str(good), 1) is None
    expert = "model.layers.0.mlp.experts.1.gate_proj"
    bad = _adapter(
        tmp_path / "bad",
        {"model.layers.0.self_attn.q_proj": (32, 32), expert: (24, 32)},
        ["q_proj", "gate_proj"],
    )
    error = manager.add_request("r2", "bad", str(bad), 2)
    assert error is not None
    assert f"targets the MoE module {expert}" in error
    assert "LoRA on MoE experts and routers is not supported" in error
    router = _adapter(tmp_path / "router", {"model.layers.0.mlp.gate": (4, 32)}, ["q_proj"])
    assert "targets the MoE module model.layers.0.mlp.gate;" in manager.add_request(
        "r3", "router", str(router), 3
    )


def test_qwen3_moe_sparse_layers_follow_transformers():
    """decoder_sparse_step and mlp_only_layers pick the same sparse layers as transformers."""
    import transformers

    from splitserve.worker.models.qwen3_moe import Qwen3MoeForCausalLM

    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3],
    )  # fmt: skip
    theirs = transformers.Qwen3MoeForCausalLM(config)
    expected = [
        type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in theirs.model.layers
    ]
    assert expected == [False, True, False, False, False, True]
    with torch.device("meta"):
        ours = Qwen3MoeForCausalLM(config, 0, 6, True, True, 64)
    assert [isinstance(layer.mlp, SparseMoE) for layer in ours.model.layers] == expected


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_moe_models_decode_without_cuda_graphs(arch, checkpoint, caplog):
    """Graph capture is off for MoE models (not yet tried on a GPU), on for dense ones, in
    the same (faked) CUDA + triton setting."""
    import logging
    from types import SimpleNamespace

    from splitserve.worker.model_runner import ModelRunner

    if arch == "mixtral":
        path = checkpoint("mixtral_moe", arch=arch, num_layers=2, **MOE_CONFIGS[arch])
    else:
        path = checkpoint("llama_graph_sizes", arch=arch, num_layers=2)
    runner = ModelRunner(WorkerConfig(model=str(path)))
    runner.device = torch.device("cuda")
    runner.backend = SimpleNamespace(name="triton")
    with caplog.at_level(logging.INFO, logger="splitserve.worker.model_runner"):
        sizes = runner.graph_sizes()
    if arch == "mixtral":
        assert sizes == []
        assert "CUDA graphs are not captured for MixtralForCausalLM" in caplog.text
    else:
        assert sizes and sizes[0] == 1
