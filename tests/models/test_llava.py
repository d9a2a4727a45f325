"""LLaVA in the in-process engine against transformers on the same tiny random checkpoint.

The prompts carry images through vLLM's `{"prompt", "multi_modal_data": {"image": ...}}`; the
model folder's own processor expands each `<image>` into its placeholder tokens. Checked:
greedy tokens equal transformers' for a batch of different images (one prompt with two), also
when prefill chunks cut through the images; each image is encoded once per request and let go
afterwards; the prefix cache serves the same image again but never another image's blocks.
"""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.common.messages_proto import generate_request_from_proto
from splitserve.protos import scheduler_pb2

from .llava_utils import NUM_IMAGE_TOKENS, build_llava, random_image, transparent_image

N = 16
TEXT = "the quick brown fox jumps over the lazy dog and keeps on running"
PROMPTS = [
    (f"{TEXT} <image> what is it?", [0]),
    (f"{TEXT} <image> what is it?", [1]),
    ("compare <image> with <image> please", [2, 3]),
]


@pytest.fixture(scope="module")
def llava_path(model_factory, tmp_path_factory):
    return build_llava(tmp_path_factory.mktemp("llava"), model_factory("llama"))


@pytest.fixture(scope="module")
def images():
    return [random_image(i, size=(40 + 4 * i, 34)) for i in range(4)]


@torch.inference_mode()
def hf_greedy(path, prompts, images) -> list[list[int]]:
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    outs = []
    for text, which in prompts:
        enc = processor(text=[text], images=[images[i] for i in which], return_tensors="pt")
        out = model.generate(
            **enc, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0
        )
        outs.append(out[0, enc["input_ids"].shape[1] :].tolist())
    return outs


@pytest.fixture(scope="module")
def hf_ref(llava_path, images):
    return hf_greedy(llava_path, PROMPTS, images)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)


def requests(images, prompts=PROMPTS):
    return [
        {"prompt": text, "multi_modal_data": {"image": [images[i] for i in which]}}
        for text, which in prompts
    ]


@pytest.mark.parametrize(
    "engine_kw",
    [{}, {"max_num_batched_tokens": 7}],  # chunks of at most 7 tokens cut through every image
    ids=["whole", "chunked"],
)
def test_llava_greedy_matches_transformers(llava_path, images, hf_ref, engine_kw):
    llm = LLM(str(llava_path), kv_cache_memory=8 << 20, enable_prefix_caching=False, **engine_kw)
    outs = llm.generate(requests(images), greedy())
    got = [o.outputs[0].token_ids for o in outs]
    assert got == hf_ref
    assert got[0] != got[1]  # the two images of the same text steer the output apart
    image_id = llm.engine.executor.runner.model.image_token_id
    for o, (_, which) in zip(outs, PROMPTS, strict=True):
        assert o.prompt_token_ids.count(image_id) == NUM_IMAGE_TOKENS * len(which)
    mm = llm.engine.executor.runner.mm
    assert mm.num_encoded == 4  # once per image, however many chunks cut through it
    assert len(mm) == 0  # nothing kept once the prompts are prefilled
    llm.shutdown()


def test_llava_prefix_cache_keeps_images_apart(llava_path, images, hf_ref):
    llm = LLM(str(llava_path), kv_cache_memory=8 << 20, block_size=16)
    first = llm.generate(requests(images, PROMPTS[:1]), greedy())[0]
    again = llm.generate(requests(images, PROMPTS[:1]), greedy())[0]
    other = llm.generate(requests(images, PROMPTS[1:2]), greedy())[0]
    ids = first.prompt_token_ids
    image_at = ids.index(llm.engine.executor.runner.model.image_token_id)
    assert first.num_cached_tokens == 0
    # Same text and image: every full block but the one holding the last prompt token.
    assert again.num_cached_tokens == (len(ids) - 1) // 16 * 16 > image_at
    # Another image after the same text: only the blocks before the image are shared.
    assert other.num_cached_tokens == image_at // 16 * 16
    outs = [first, again, other]
    assert [o.outputs[0].token_ids for o in outs] == [hf_ref[0], hf_ref[0], hf_ref[1]]
    assert again.prompt_token_ids == ids  # expanded from the preprocessor cache
    assert llm._images.cache.hits == 1
    # Same text and image, other words after it: the hit ends inside the image, whose
    # embeddings are then spliced in from the middle.
    tail = [(f"{TEXT} <image> tell me more about it now", [0])]
    later = llm.generate(requests(images, tail), greedy())[0]
    image_end = image_at + NUM_IMAGE_TOKENS
    assert image_at < later.num_cached_tokens == image_end // 16 * 16 < image_end
    assert later.outputs[0].token_ids == hf_greedy(llava_path, tail, images)[0]
    llm.shutdown()


@pytest.mark.parametrize("cache_images", [2, 1])
def test_llava_encoder_cache_reuses_images_across_requests(llava_path, images, cache_images):
    """The scheduler's encoder cache: the same image under other words (no prefix-cache hit)
    is not encoded again; with room for one image, the other image evicts it and it is
    encoded again. Every output equals transformers'."""
    llm = LLM(
        str(llava_path),
        kv_cache_memory=8 << 20,
        enable_prefix_caching=False,
        encoder_cache_size=cache_images * NUM_IMAGE_TOKENS,
    )
    prompts = [
        (f"{TEXT} <image> what is it?", [0]),
        ("describe <image> in a few words", [0]),
        ("and now <image>", [1]),
        ("once more <image>", [0]),
    ]
    mm = llm.engine.executor.runner.mm
    got, encoded = [], []
    for p in prompts:
        got.append(llm.generate(requests(images, [p]), greedy())[0].outputs[0].token_ids)
        encoded.append(mm.num_encoded)
    assert got == hf_greedy(llava_path, prompts, images)
    stats = llm.engine.scheduler.stats()
    if cache_images == 2:
        assert encoded == [1, 1, 2, 2]  # image 0 encoded once for three requests
        assert (stats.encoder_cache_queries, stats.encoder_cache_hits) == (4, 2)
    else:
        assert encoded == [1, 1, 2, 3]  # image 1 evicted image 0, so it was encoded again
        assert (stats.encoder_cache_queries, stats.encoder_cache_hits) == (4, 1)
    assert len(mm.cache) == cache_images  # the worker holds what the scheduler's table says
    llm.shutdown()


def test_llava_refuses_bad_image_inputs(llava_path, images):
    llm = LLM(str(llava_path), kv_cache_memory=8 << 20, limit_mm_per_prompt={"image": 1})
    bad = [
        (
            {"prompt": "two <image> <image>", "multi_modal_data": {"image": images[:2]}},
            "limit of 1",
        ),
        ({"prompt": "none here", "multi_modal_data": {"image": images[0]}}, "0 image placeholders"),
        ({"prompt": "<image>", "multi_modal_data": {"image": "cat.png"}}, "must be a PIL image"),
        ({"prompt": "<image>", "multi_modal_data": {"video": []}}, "'image' or 'audio'"),
        ({"prompt_token_ids": [5, 6], "multi_modal_data": {"image": images[0]}}, "text prompt"),
    ]
    for prompt, match in bad:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, greedy())
    ok = llm.generate({"prompt": "a <image>", "multi_modal_data": {"image": images[0]}}, greedy())
    assert len(ok[0].outputs[0].token_ids) == N
    llm.shutdown()


def test_limit_mm_per_prompt_is_checked():
    from splitserve.common.mm_limits import canonical_mm_limits, parse_mm_limits

    assert parse_mm_limits(None) == {"image": 4, "audio": 4}
    assert parse_mm_limits('{"image": 2}') == {"image": 2, "audio": 4}
    assert parse_mm_limits("image=3,audio=1") == {"image": 3, "audio": 1}  # older vLLM's form
    assert canonical_mm_limits({"image": 0}) == '{"audio":4,"image":0}'
    for value, match in [
        ("[1]", "JSON object"),
        ("{", "JSON object"),
        ('{"image": -1}', "non-negative integer"),
        ("image=-1", "non-negative integer"),
        ("video=1", "unsupported modality 'video'"),
        ('{"image": true}', "non-negative integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_mm_limits(value)


def test_llava_survives_preemption(llava_path, images, hf_ref):
    """A KV pool too small for the batch: requests are preempted and resumed with their
    images sent again (and encoded again); the tokens still equal transformers'."""
    # 9 blocks of 16: the two-image prompt (60 tokens, 4 blocks) and the next (65 tokens, 5
    # blocks) fill the pool; the first needs a fifth block after 4 outputs.
    llm = LLM(
        str(llava_path), num_gpu_blocks_override=9, block_size=16, enable_prefix_caching=False
    )
    order = [2, 0, 1]
    outs = llm.generate(requests(images, [PROMPTS[i] for i in order]), greedy())
    assert [o.outputs[0].token_ids for o in outs] == [hf_ref[i] for i in order]
    assert llm.engine.scheduler.num_preemptions > 0
    assert len(llm.engine.executor.runner.mm) == 0
    llm.shutdown()


def test_worker_refuses_inconsistent_image_spans(llava_path, images):
    """A direct engine caller whose image span does not hold image tokens, is the wrong
    length for the model, or whose image has the wrong size fails alone (per-request error);
    the engine keeps serving."""
    llm = LLM(str(llava_path), kv_cache_memory=8 << 20)
    good = llm.generate(requests(images, PROMPTS[:1]), greedy())[0]
    item = llm._images.process(PROMPTS[0][0], [images[0]]).mm_inputs[0]
    ids = good.prompt_token_ids
    sched = llm.engine.scheduler
    cases = {
        "shifted": (item.offset - 1, item.length, "other tokens than the image token"),
        "short": (item.offset, item.length - 1, "placeholder tokens, the model yields"),
    }
    cases["pixels"] = (item.offset, item.length, "pixel_values of shape [3, 30, 29]")
    for rid, (offset, length, _) in cases.items():
        bad = type(item)()
        bad.CopyFrom(item)
        bad.offset, bad.length = offset, length
        if rid == "pixels":  # a direct caller's wrong-sized image must not reach the encoder
            bad.pixel_values.shape[:] = [3, 30, 29]
            bad.pixel_values.data = bad.pixel_values.data[: 4 * 3 * 30 * 29]
        sched.add_request(
            generate_request_from_proto(
                scheduler_pb2.GenerateRequest(
                    request_id=rid,
                    prompt_token_ids=ids,
                    sampling_params=greedy().to_proto(),
                    mm_inputs=[bad],
                )
            )
        )
    errors = {}
    while llm.engine.has_work:
        for out in llm.engine.step():
            if out.error:
                errors[out.request_id] = out.error
    assert set(errors) == set(cases)
    for rid, (_, _, match) in cases.items():
        assert match in errors[rid]
    again = llm.generate(requests(images, PROMPTS[:1]), greedy())[0]
    assert again.outputs[0].token_ids == good.outputs[0].token_ids
    llm.shutdown()


@pytest.mark.parametrize(
    "renames",
    [
        # llava-hf's checkpoints nest the CLIP tower one level deeper
        [("vision_tower.", "vision_tower.vision_model.")],
        # transformers' own module paths
        [
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
        ],
    ],
    ids=["vision_model", "module_paths"],
)
def test_llava_loads_other_checkpoint_names(llava_path, images, hf_ref, tmp_path, renames):
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "renamed"
    shutil.copytree(llava_path, out)
    tensors = load_file(out / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        renamed[name] = t
    assert set(renamed) != set(tensors)
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(str(out), kv_cache_memory=8 << 20)
    got = llm.generate(requests(images, PROMPTS[:1]), greedy())[0].outputs[0].token_ids
    assert got == hf_ref[0]
    llm.shutdown()


def test_llava_chat_takes_data_urls_and_pil_images(llava_path, images):
    import base64
    import io

    import transformers

    rgba = transparent_image("RGBA", seed=3)
    buf = io.BytesIO()
    images[1].save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    question = "what is it?"
    text = {"type": "text", "text": question}
    conversations = [
        [{"role": "user", "content": [{"type": "image_pil", "image_pil": images[0]}, text]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, text]}],
        # Semi-transparent: composited onto white as transformers' processor does.
        [{"role": "user", "content": [{"type": "image_pil", "image_pil": rgba}, text]}],
    ]
    tok = transformers.AutoTokenizer.from_pretrained(llava_path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{question}"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    want = hf_greedy(llava_path, [(prompt, [0]), (prompt, [1]), (prompt, [2])], [*images[:2], rgba])
    llm = LLM(str(llava_path), kv_cache_memory=8 << 20)
    outs = [llm.chat(conv, greedy())[0] for conv in conversations]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert outs[0].prompt == prompt
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a"}}]}]
    with pytest.raises(ValueError, match="fetches nothing"):
        llm.chat(bad, greedy())
    llm.shutdown()
