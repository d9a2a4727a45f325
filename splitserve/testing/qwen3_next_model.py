"""A tiny random `Qwen3NextForCausalLM` checkpoint (gated delta net layers interleaved with
gated full attention, MoE with a shared expert) with the demo tokenizer."""

from __future__ import annotations

import os
import pathlib

from splitserve.testing.mamba2_model import _tokenizer


def build_qwen3_next(
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    layer_types: tuple[str, ...] = ("linear_attention", "full_attention", "linear_attention"),
    num_experts: int = 4,
    mlp_only_layers: tuple[int, ...] = (),
    seed: int = 0,
    **config_kwargs,
) -> pathlib.Path:
    """Save the checkpoint; `config_kwargs` are further `Qwen3NextConfig` fields."""
    import torch
    import transformers

    out = pathlib.Path(out_dir)
    tok = _tokenizer(out, tokenizer_dir, vocab_size)
    fields = {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 2 * hidden_size,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 1024,
        "initializer_range": 0.1,
        **config_kwargs,
    }
    cfg = transformers.Qwen3NextConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=len(layer_types),
        layer_types=list(layer_types),
        num_experts=num_experts,
        mlp_only_layers=list(mlp_only_layers),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        **fields,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    with torch.no_grad():
        # The init leaves the (1 + weight) norms at exactly one and dt_bias at one: perturb
        # them so a loader that drops the offset or a parameter shows in the outputs.
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out
