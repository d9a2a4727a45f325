"""A tiny random Qwen2-Audio checkpoint (Whisper-style encoder + Qwen2), saved by transformers,
with a processor whose feature extractor fits its short window."""

from __future__ import annotations

import pathlib

SAMPLING_RATE = 16000
MAX_SOURCE_POSITIONS = 100  # encoder window: 200 mel frames = 2 s at a 10 ms hop
CHUNK_SECONDS = 2 * MAX_SOURCE_POSITIONS * 160 // SAMPLING_RATE
NUM_MEL_BINS = 16


def build_qwen2_audio(out_dir, tokenizer_dir, seed: int = 0) -> pathlib.Path:
    """Save a tiny Qwen2-Audio (2 encoder layers, 2 Qwen2 layers) with `<|AUDIO|>`,
    `<|audio_bos|>` and `<|audio_eos|>` added to the tokenizer of `tokenizer_dir`, and a
    Whisper feature extractor of NUM_MEL_BINS bins over the encoder's window."""
    import torch
    import transformers

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"], special_tokens=True)
    audio_token_id = tok.convert_tokens_to_ids("<|AUDIO|>")
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            num_mel_bins=NUM_MEL_BINS,
            max_source_positions=MAX_SOURCE_POSITIONS,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tok) + 13,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=0.2,
            tie_word_embeddings=False,
        ),
        audio_token_index=audio_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():  # visible audio effects: the default init leaves the tower near zero
        for name, p in model.named_parameters():
            if ("audio_tower" in name or "multi_modal_projector" in name) and p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=NUM_MEL_BINS,
        sampling_rate=SAMPLING_RATE,
        hop_length=160,
        chunk_length=CHUNK_SECONDS,
        n_fft=400,
    )
    processor = transformers.Qwen2AudioProcessor(
        feature_extractor=extractor, tokenizer=tok, chat_template=tok.chat_template
    )
    processor.save_pretrained(out)
    return out


def random_audio(seed: int, seconds: float):
    """Float32 mono samples at SAMPLING_RATE: a tone plus noise, different per seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    tone = 0.4 * np.sin(2 * np.pi * (200 + 150 * seed) * t)
    return (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
