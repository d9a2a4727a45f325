"""Tiny random MiniMax checkpoints (transformers' `MiniMaxForCausalLM`: lightning and softmax
attention layers, sparse MoE) with the demo tokenizer or a given one."""

from __future__ import annotations

import os
import pathlib

from splitserve.testing.mamba2_model import _tokenizer


def minimax_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layer_types: tuple[str, ...] = ("linear_attention", "full_attention", "linear_attention"),
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    num_experts: int = 4,
    top_k: int = 2,
    block_size: int = 16,
    **config_kwargs,
):
    """A `transformers.MiniMaxConfig`; `block_size` 16 cuts every test prompt into blocks."""
    import transformers

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size,
        num_hidden_layers=len(layer_types),
        layer_types=list(layer_types),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        block_size=block_size,
        max_position_embeddings=1024,
        initializer_range=0.1,
    )
    kwargs.update(config_kwargs)
    return transformers.MiniMaxConfig(**kwargs)


def build_minimax(
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    vocab_size: int = 1000,
    seed: int = 0,
    **config_kwargs,
) -> pathlib.Path:
    """Save the checkpoint; `config_kwargs` go to `minimax_config` (layer_types, block_size,
    the residual alpha / beta factors, ...)."""
    import torch
    import transformers

    out = pathlib.Path(out_dir)
    tok = _tokenizer(out, tokenizer_dir, vocab_size)
    cfg = minimax_config(
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = transformers.MiniMaxForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return out
