"""A tiny random Mamba2 checkpoint (transformers `Mamba2ForCausalLM`) with the demo tokenizer."""

from __future__ import annotations

import os
import pathlib
import shutil

from splitserve.testing.demo_model import build_tokenizer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""What `tokenizer_dir` gives the checkpoint (a model folder may hold other weights)."""


def build_mamba2(
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_heads: int = 8,
    head_dim: int = 16,
    state_size: int = 16,
    n_groups: int = 2,
    num_layers: int = 2,
    conv_kernel: int = 4,
    chunk_size: int = 32,
    seed: int = 0,
    **config_kwargs,
) -> pathlib.Path:
    """Save the checkpoint (expand = num_heads * head_dim / hidden_size); `tokenizer_dir`
    (a tokenizer or model folder) gives its tokenizer files instead of training one. `config_kwargs` are further
    `Mamba2Config` fields (use_bias, time_step_limit, hidden_act, ...)."""
    import torch
    import transformers

    out = pathlib.Path(out_dir)
    if tokenizer_dir is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (pathlib.Path(tokenizer_dir) / name).exists():
                shutil.copy(pathlib.Path(tokenizer_dir) / name, out / name)
    else:
        build_tokenizer(out, vocab_size=vocab_size)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    expand = num_heads * head_dim // hidden_size
    cfg = transformers.Mamba2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_heads=num_heads,
        head_dim=head_dim,
        state_size=state_size,
        n_groups=n_groups,
        expand=expand,
        num_hidden_layers=num_layers,
        conv_kernel=conv_kernel,
        chunk_size=chunk_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return out
