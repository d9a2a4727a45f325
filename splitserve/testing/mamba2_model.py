"""Tiny random state-space checkpoints with the demo tokenizer: transformers' `Mamba2ForCausalLM`
and the hybrid attention + Mamba2 `BambaForCausalLM` and `NemotronHForCausalLM`."""

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


def _tokenizer(out: pathlib.Path, tokenizer_dir, vocab_size: int):
    import transformers

    if tokenizer_dir is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (pathlib.Path(tokenizer_dir) / name).exists():
                shutil.copy(pathlib.Path(tokenizer_dir) / name, out / name)
    else:
        build_tokenizer(out, vocab_size=vocab_size)
    return transformers.AutoTokenizer.from_pretrained(out)


def build_bamba(
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_layers: int = 3,
    attn_layer_indices: tuple[int, ...] = (1,),
    num_heads: int = 4,
    num_kv_heads: int = 2,
    mamba_n_heads: int = 8,
    mamba_d_head: int = 16,
    mamba_d_state: int = 16,
    mamba_n_groups: int = 2,
    mamba_chunk_size: int = 32,
    seed: int = 0,
    **config_kwargs,
) -> pathlib.Path:
    """Save a hybrid checkpoint: Mamba2 mixers everywhere but `attn_layer_indices`."""
    import torch
    import transformers

    out = pathlib.Path(out_dir)
    tok = _tokenizer(out, tokenizer_dir, vocab_size)
    cfg = transformers.BambaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        attn_layer_indices=list(attn_layer_indices),
        mamba_n_heads=mamba_n_heads,
        mamba_d_head=mamba_d_head,
        mamba_d_state=mamba_d_state,
        mamba_n_groups=mamba_n_groups,
        mamba_chunk_size=mamba_chunk_size,
        mamba_expand=mamba_n_heads * mamba_d_head // hidden_size,
        max_position_embeddings=1024,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = transformers.BambaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return out


def build_nemotron_h(
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    vocab_size: int = 1000,
    pattern: str = "M*M-",
    hidden_size: int = 64,
    seed: int = 0,
    **config_kwargs,
) -> pathlib.Path:
    """Save a NemotronH checkpoint whose blocks follow `pattern` (M Mamba2, * attention, - MLP)."""
    import torch
    import transformers

    out = pathlib.Path(out_dir)
    tok = _tokenizer(out, tokenizer_dir, vocab_size)
    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    cfg = transformers.NemotronHConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        layers_block_type=[kinds[c] for c in pattern],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=2 * hidden_size,
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        chunk_size=32,
        max_position_embeddings=1024,
        initializer_range=0.1,
        use_mamba_kernels=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return out


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
    tok = _tokenizer(out, tokenizer_dir, vocab_size)
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
