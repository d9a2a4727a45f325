"""Whisper in the in-process engine against transformers on the same tiny random checkpoint.

Prompts carry the decoder prompt (Whisper's task tokens) and the audio through vLLM's
`{"prompt", "multi_modal_data": {"audio": (samples, rate)}}`. Checked: greedy tokens equal
`WhisperForConditionalGeneration.generate` for several requests at once (the encoder runs once
per request, the cross-attention K/V sit in per-request slots), also with prefill chunks of
one token and when a small KV cache forces preemption (the slot is freed and the encoder runs
again on resume); slots are all free after the batch; the audio decides the tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve import LLM, SamplingParams

from .whisper_utils import SAMPLING_RATE, build_whisper, random_audio

N = 12
PREFIX = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"
PROMPTS = [
    (PREFIX, 0),
    (PREFIX, 1),
    ("<|startoftranscript|><|fr|><|translate|><|notimestamps|>", 2),
    (f"<|startofprev|>the previous words{PREFIX}", 3),
]


@pytest.fixture(scope="module")
def whisper_path(model_factory, tmp_path_factory):
    return build_whisper(tmp_path_factory.mktemp("whisper"), model_factory("qwen2"))


@pytest.fixture(scope="module")
def clips():
    return [random_audio(i, seconds) for i, seconds in enumerate((1.0, 2.5, 0.6, 4.0))]


@torch.inference_mode()
def hf_greedy(path, prompts, clips, n=N) -> list[list[int]]:
    """transformers' Whisper generate, greedy, EOS ignored (n new tokens each)."""
    import transformers

    extractor = transformers.WhisperFeatureExtractor.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(path).eval()
    outs = []
    for text, which in prompts:
        feats = extractor(clips[which], sampling_rate=SAMPLING_RATE, return_tensors="pt")
        prompt = tok.encode(text, add_special_tokens=False)
        out = model.generate(
            feats.input_features,
            decoder_input_ids=torch.tensor([prompt]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
        outs.append(out[0].tolist()[-n:])
    return outs


@pytest.fixture(scope="module")
def hf_ref(whisper_path, clips):
    return hf_greedy(whisper_path, PROMPTS, clips)


def greedy(n=N) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def requests(clips, prompts=PROMPTS):
    return [
        {"prompt": text, "multi_modal_data": {"audio": (clips[i], SAMPLING_RATE)}}
        for text, i in prompts
    ]


@pytest.mark.parametrize(
    "engine_kw",
    [
        {},
        {"max_num_batched_tokens": 3},  # prompts computed in chunks, decodes batched with them
        # 2 layers x (K, V) x 32 dims x 4 bytes x 4 tokens: 8 blocks of 4, which the four
        # requests (16 to 24 tokens each) outgrow while decoding: preemption.
        {"kv_cache_memory": 2 * 2 * 32 * 4 * 4 * 8, "block_size": 4},
    ],
)
def test_greedy_matches_transformers(whisper_path, clips, hf_ref, engine_kw):
    llm = LLM(str(whisper_path), max_num_seqs=4, enable_prefix_caching=False, **engine_kw)
    outs = llm.generate(requests(clips), greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_ref
    runner = llm.engine.executor.runner
    assert runner.cross.num_free == runner.cross.num_slots
    if "kv_cache_memory" in engine_kw:
        assert llm.engine.scheduler.num_preemptions > 0
        assert runner.cross.num_encoded > len(PROMPTS)  # re-encoded on resume
    else:
        assert runner.cross.num_encoded == len(PROMPTS) + 1  # + the warm-up request


def test_audio_decides_the_tokens(whisper_path, clips, hf_ref):
    llm = LLM(str(whisper_path), max_num_seqs=2)
    assert llm.max_model_len == 448  # the decoder's max_target_positions
    same = requests(clips, [(PREFIX, 0), (PREFIX, 0)])
    other = requests([np.flip(clips[0]).copy()], [(PREFIX, 0)])
    outs = llm.generate(same + other, greedy(), use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert tokens[0] == tokens[1] == hf_ref[0]
    assert tokens[2] != tokens[0]  # same decoder prompt, other audio: no shared cache state


def test_decoder_length_bounds_max_model_len(whisper_path):
    """The decoder's learned positions (max_target_positions, 448 as released) cap
    max_model_len; asking for more is refused with both numbers."""
    with pytest.raises(ValueError, match=r"max_target_positions=448.*at most 448"):
        LLM(str(whisper_path), max_model_len=449)


def test_lora_and_quantization_are_refused_not_ignored(whisper_path):
    with pytest.raises(ValueError, match="--enable-lora is not supported with Whisper"):
        LLM(str(whisper_path), enable_lora=True)
    # Its projections are plain torch layers: nothing would be quantized.
    with pytest.raises(ValueError, match=r"'fp8': WhisperForConditionalGeneration builds its"):
        LLM(str(whisper_path), quantization="fp8")


def test_abort_frees_the_cross_attention_slot(whisper_path, clips):
    """An aborted request's slot comes back (the release reaches the worker even when no
    other step runs), and the freed slot serves the next request correctly."""
    from splitserve.common import messages as msg
    from splitserve.common.messages_proto import mm_input_from_proto

    llm = LLM(str(whisper_path), max_num_seqs=2)
    engine, runner = llm.engine, llm.engine.executor.runner
    processed = llm._audio.process(PREFIX, [(clips[0], SAMPLING_RATE)])
    for rid in ("a", "b"):
        engine.scheduler.add_request(
            msg.GenerateRequest(
                request_id=rid,
                prompt_token_ids=list(processed.token_ids),
                sampling_params=msg.SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                mm_inputs=[mm_input_from_proto(m) for m in processed.mm_inputs],
            ),
            None,
        )
    while runner.cross.num_free:
        engine.step()  # both admitted: both slots taken
    assert set(runner.cross.slot_of) == {"a", "b"}
    engine.scheduler.abort_request("a")
    engine.scheduler.abort_request("b")
    while engine.has_work:
        engine.step()
    assert runner.cross.num_free == 2 and not runner.cross.slot_of
    out = llm.generate(requests(clips, [PROMPTS[1]]), greedy(), use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == hf_greedy(whisper_path, [PROMPTS[1]], clips)[0]


def test_slots_follow_the_agreed_max_num_seqs_and_the_profile_runs(whisper_path):
    """A worker left at the default max_num_seqs takes the scheduler's before it measures
    memory: its slots are refitted to that number (never fewer than the scheduler admits).
    The memory profile's forward runs the encoder and the cross-attention."""
    from splitserve.common import engine_config
    from splitserve.scheduler.config import SchedulerConfig
    from splitserve.worker.config import WorkerConfig
    from splitserve.worker.model_runner import ModelRunner

    runner = ModelRunner(WorkerConfig(model=str(whisper_path), kv_cache_memory=1 << 20))
    assert runner.cross.num_slots == 256  # the default, until the scheduler says otherwise
    scheduler = engine_config.engine_values(SchedulerConfig(max_num_seqs=300), "scheduler")
    runner.describe(16, engine_config.to_proto(scheduler))
    assert runner.config.max_num_seqs == 300
    assert runner.cross.num_slots == runner.cross.num_free == 300
    layer = runner.model.model.decoder.layers[0]
    assert layer.cross_cache[0] is runner.cross.caches[0][0]  # the new slots are bound
    runner.profile_forward()


def test_slots_past_the_machine_are_refused_with_the_sizes(whisper_path):
    """One slot is 2 layers x (K, V) x 1500 positions x 32 wide x 4 bytes = 750 KiB; ten
    million of them cannot be held: a clear start-up error, not an allocation that is killed
    when touched."""
    with pytest.raises(ValueError, match=r"10000000 \(max_num_seqs\) x 0\.7 MiB.*--max-num-seqs"):
        LLM(str(whisper_path), max_num_seqs=10_000_000)
