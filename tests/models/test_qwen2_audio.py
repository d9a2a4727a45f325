"""Qwen2-Audio in the in-process engine against transformers on the same tiny random checkpoint.

Prompts carry audio through vLLM's `{"prompt", "multi_modal_data": {"audio": (samples, rate)}}`;
the model folder's own processor (Whisper log-mel features, `<|AUDIO|>` expanded per item
length) makes the inputs. Checked: greedy tokens equal transformers' for audio of different
lengths (one prompt with two), also when prefill chunks cut through the audio; each item is
encoded once; an item given at another sampling rate is resampled first (band-limited), and
the result equals transformers fed the same resampled samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.tokenizer_svc import audio as audio_io

from .qwen2_audio_utils import SAMPLING_RATE, build_qwen2_audio, random_audio

N = 12
SLOT = "<|audio_bos|><|AUDIO|><|audio_eos|>"
PROMPTS = [
    (f"listen {SLOT} what is it?", [0]),
    (f"listen {SLOT} what is it?", [1]),
    (f"compare {SLOT} with {SLOT} please", [2, 3]),
]


@pytest.fixture(scope="module")
def qwen2_audio_path(model_factory, tmp_path_factory):
    return build_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio"), model_factory("qwen2"))


@pytest.fixture(scope="module")
def clips():
    return [random_audio(i, seconds) for i, seconds in enumerate((0.5, 1.1, 0.3, 1.9))]


@torch.inference_mode()
def hf_greedy(path, prompts, clips) -> list[list[int]]:
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    outs = []
    for text, which in prompts:
        enc = processor(
            text=[text],
            audio=[clips[i] for i in which],
            sampling_rate=SAMPLING_RATE,
            return_tensors="pt",
        )
        out = model.generate(
            **enc, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0
        )
        outs.append(out[0, enc["input_ids"].shape[1] :].tolist())
    return outs


@pytest.fixture(scope="module")
def hf_ref(qwen2_audio_path, clips):
    return hf_greedy(qwen2_audio_path, PROMPTS, clips)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)


def requests(clips, prompts=PROMPTS, rate=SAMPLING_RATE):
    return [
        {"prompt": text, "multi_modal_data": {"audio": [(clips[i], rate) for i in which]}}
        for text, which in prompts
    ]


@pytest.mark.parametrize(
    "engine_kw",
    [{}, {"max_num_batched_tokens": 7}],  # chunks of at most 7 tokens cut through every item
    ids=["whole", "chunked"],
)
def test_qwen2_audio_greedy_matches_transformers(qwen2_audio_path, clips, hf_ref, engine_kw):
    llm = LLM(
        str(qwen2_audio_path), kv_cache_memory=8 << 20, enable_prefix_caching=False, **engine_kw
    )
    outs = llm.generate(requests(clips), greedy())
    got = [o.outputs[0].token_ids for o in outs]
    assert got == hf_ref
    assert got[0] != got[1]  # two clips under the same text steer the output apart
    model = llm.engine.executor.runner.model
    counts = [o.prompt_token_ids.count(model.audio_token_id) for o in outs]
    assert counts[0] != counts[1]  # items of different lengths get different token counts
    mm = llm.engine.executor.runner.mm
    assert mm.num_encoded == 4  # once per item, however many chunks cut through it
    assert len(mm) == 0
    llm.shutdown()


def test_qwen2_audio_resamples_other_rates(qwen2_audio_path, clips):
    """A 44.1 kHz item is resampled to the extractor's 16 kHz before the processor: the output
    equals transformers fed the same resampled samples."""
    rate = 44100
    clip = audio_io.resample(clips[0], SAMPLING_RATE, rate)
    expected = hf_greedy(
        qwen2_audio_path, PROMPTS[:1], [audio_io.resample(clip, rate, SAMPLING_RATE)]
    )
    llm = LLM(str(qwen2_audio_path), kv_cache_memory=8 << 20)
    out = llm.generate(requests([clip], PROMPTS[:1], rate=rate), greedy())[0]
    assert out.outputs[0].token_ids == expected[0]
    llm.shutdown()


def test_qwen2_audio_refuses_bad_audio_inputs(qwen2_audio_path, clips):
    llm = LLM(str(qwen2_audio_path), kv_cache_memory=8 << 20)
    text = PROMPTS[0][0]
    for data, match in [
        ({"audio": [(clips[0], SAMPLING_RATE)] * 2}, "2 audio items"),
        ({"audio": clips[0]}, r"\(samples, sampling_rate\) pair"),
        ({"audio": (clips[0], 0)}, "sampling rate 0"),
        ({"audio": (np.full(100, np.nan, dtype=np.float32), SAMPLING_RATE)}, "not finite"),
        ({"audio": (np.zeros((2, 2, 2), np.float32), SAMPLING_RATE)}, "mono samples"),
        ({"image": []}, "does not take image inputs"),
    ]:
        with pytest.raises(ValueError, match=match):
            llm.generate({"prompt": text, "multi_modal_data": data}, greedy())
    llm.shutdown()


def test_quantization_names_the_layers_it_leaves_unquantized(qwen2_audio_path, caplog):
    """--quantization fp8 reaches the language model's layers; the audio encoder's plain torch
    projections stay in full precision, and the log says which."""
    from splitserve.worker.config import WorkerConfig
    from splitserve.worker.model_loader import load_model

    with caplog.at_level("WARNING", logger="splitserve.worker.quantization"):
        model = load_model(WorkerConfig(model=str(qwen2_audio_path), quantization="fp8")).model
    assert "plain torch projections of Qwen2AudioForConditionalGeneration stay unquantized" in (
        caplog.text
    )
    assert "audio_tower.layers.0.self_attn" in caplog.text
    qkv = model.language_model.model.layers[0].self_attn.qkv_proj
    assert type(qkv.method).__name__ == "Fp8OnlineLinearMethod"
