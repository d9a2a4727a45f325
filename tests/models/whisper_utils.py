"""A tiny random Whisper checkpoint saved by transformers: Whisper's real 30 s window (80 mel
bins, 3000 frames, 1500 encoder positions) with tiny widths, a locally trained tokenizer with
Whisper's special tokens added, and a WhisperFeatureExtractor."""

from __future__ import annotations

import pathlib

SAMPLING_RATE = 16000
LANGUAGES = ["en", "fr", "de"]
SPECIAL = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    *(f"<|{code}|>" for code in LANGUAGES),
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
]


TIMESTAMPS = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
"""Whisper's timestamp tokens, <|0.00|> to <|30.00|>, consecutive ids after SPECIAL."""


def build_whisper(
    out_dir,
    tokenizer_dir,
    seed: int = 0,
    max_target_positions: int = 448,
    timestamps: bool = True,
):
    """Save a tiny WhisperForConditionalGeneration (2 encoder, 2 decoder layers, d_model 32)
    with its tokenizer (timestamp tokens too, unless not `timestamps`) and feature
    extractor; returns the folder."""
    import torch
    import transformers

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(SPECIAL, special_tokens=True)
    if timestamps:
        tok.add_tokens(TIMESTAMPS, special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    tok.eos_token = "<|endoftext|>"
    tok.pad_token = "<|endoftext|>"
    config = transformers.WhisperConfig(
        vocab_size=len(tok) + 11,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=max_target_positions,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        suppress_tokens=None,
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # visible audio effects: the default init leaves the weights small
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        max_length=max_target_positions,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return out


def random_audio(seed: int, seconds: float, rate: int = SAMPLING_RATE):
    """Float32 mono samples: a gliding tone plus noise, different per seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.4 * np.sin(2 * np.pi * (200 + 150 * seed) * t * (1 + 0.2 * t))
    return (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
