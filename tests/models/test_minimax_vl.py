"""MiniMax-VL-01 (CLIP tower, projector, image newline, any-resolution tiles, MiniMax text model)
in the in-process engine against an oracle composed from transformers' own pieces on the same
tiny random checkpoint: transformers' CLIPVisionModel and LLaVA-NeXT projector, its LLaVA-NeXT
grid and unpad helpers, and its MiniMaxForCausalLM fed the spliced input embeddings, stitched
the way MiniMax-VL-01's code does (whole-image tile first, then the unpadded tile map with a
newline per row). transformers has no MiniMax-VL class.

Images of three shapes pick three different tile grids (one is really unpadded); the model
folder's LLaVA-NeXT processor expands each `<image>` into its count of placeholders.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from splitserve import LLM, SamplingParams

from .llava_utils import random_image
from .minimax_vl_utils import build_minimax_vl

N = 12
TEXT = "the quick brown fox jumps over the lazy dog and keeps on running"
PROMPTS = [
    (f"{TEXT} <image> what is it?", [0]),
    (f"{TEXT} <image> what is it?", [1]),
    ("compare <image> with <image> please", [2, 0]),
]
# (width, height): grids 2x2 (padding cut top and bottom), 2x1, 1x2; sizes for which
# transformers' rounding and MiniMax's integer unpad agree.
SIZES = [(40, 30), (20, 40), (60, 30)]


@pytest.fixture(scope="module")
def vl_path(model_factory, tmp_path_factory):
    return build_minimax_vl(tmp_path_factory.mktemp("minimax-vl") / "m", model_factory("llama"))


@pytest.fixture(scope="module")
def images():
    return [random_image(i, size=s) for i, s in enumerate(SIZES)]


def _stitch(features, size, rows, cols, newline):
    """MiniMax-VL-01's composition of one image's tile features [1 + rows * cols, P * P, D]."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    base, tiles = features[0], features[1:]
    side = int(base.shape[0] ** 0.5)
    grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)
    grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), size)
    grid = torch.cat([grid, newline[:, None, None].expand(*grid.shape[:-1], 1)], dim=-1)
    return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)])


@torch.inference_mode()
def hf_greedy(path, prompts, images) -> list[list[int]]:
    import transformers
    from safetensors.torch import load_file
    from transformers.models.llava_next.modeling_llava_next import (
        LlavaNextMultiModalProjector,
        get_anyres_image_grid_shape,
    )

    path = pathlib.Path(path)
    cfg = transformers.AutoConfig.from_pretrained(path)
    weights = load_file(str(path / "model.safetensors"))

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}

    tower = transformers.CLIPVisionModel(cfg.vision_config).eval()
    tower.load_state_dict(part("vision_tower."))
    projector = LlavaNextMultiModalProjector(cfg).eval()
    projector.load_state_dict(part("multi_modal_projector."))
    newline = weights["image_newline"]
    lm = transformers.MiniMaxForCausalLM.from_pretrained(f"{path}-text").eval()
    lm.generation_config.eos_token_id = None
    processor = transformers.AutoProcessor.from_pretrained(path)
    outs = []
    for text, which in prompts:
        enc = processor(text=[text], images=[images[i] for i in which], return_tensors="pt")
        feats = []
        for k, size in enumerate(enc["image_sizes"].tolist()):
            rows, cols = get_anyres_image_grid_shape(
                size, cfg.image_grid_pinpoints, cfg.vision_config.image_size
            )
            tiles = enc["pixel_values"][k][: 1 + rows * cols]
            hidden = tower(tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
            feats.append(_stitch(projector(hidden), size, rows, cols, newline))
        ids = enc["input_ids"]
        embeds = lm.get_input_embeddings()(ids)
        embeds[ids == cfg.image_token_index] = torch.cat(feats)
        out = lm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            pad_token_id=0,
        )
        outs.append(out[0, -N:].tolist())
    return outs


@pytest.fixture(scope="module")
def hf_ref(vl_path, images):
    return hf_greedy(vl_path, PROMPTS, images)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)


def requests(images, prompts=PROMPTS):
    return [
        {"prompt": text, "multi_modal_data": {"image": [images[i] for i in which]}}
        for text, which in prompts
    ]


@pytest.mark.parametrize(
    "engine_kw",
    [{}, {"max_num_batched_tokens": 16}],  # chunks cut through every image and the state
    ids=["whole", "chunked"],
)
def test_minimax_vl_greedy_matches_composed_transformers(vl_path, images, hf_ref, engine_kw):
    llm = LLM(str(vl_path), kv_cache_memory=8 << 20, enable_prefix_caching=False, **engine_kw)
    try:
        outs = llm.generate(requests(images), greedy())
        got = [list(o.outputs[0].token_ids) for o in outs]
        assert got == hf_ref
        assert got[0] != got[1]  # the two images of the same text steer the output apart
        model = llm.engine.executor.runner.model
        counts = [o.prompt_token_ids.count(model.image_token_id) for o in outs]
        # 16 whole-image patches + the unpadded map with a newline per row, per image.
        assert counts == [16 + 6 * 9, 16 + 8 * 5, (16 + 4 * 9) + (16 + 6 * 9)]
        # Three distinct images: the first prompt's image, met again in the third, is taken
        # from the encoder cache by its hash.
        assert llm.engine.executor.runner.mm.num_encoded == 3
        # The processor pads the third prompt's 1x2-grid image to the 2x2 image's five tiles;
        # the tokenizer side drops the padding, so its bytes are its own.
        third = llm._images.process(PROMPTS[2][0], [images[2], images[0]])
        assert [list(m.pixel_values.shape) for m in third.mm_inputs] == [
            [3, 3, 24, 24],
            [5, 3, 24, 24],
        ]
        alone = llm._images.process("<image>", [images[2]])
        assert alone.mm_inputs[0].hash == third.mm_inputs[0].hash
    finally:
        llm.shutdown()


def test_minimax_vl_prefix_hit_restores_state_after_an_image(vl_path, images, hf_ref):
    """The same image prompt twice: the second starts from the cached blocks and the lightning
    state snapshot of the cached prefix, and still matches."""
    llm = LLM(str(vl_path), kv_cache_memory=8 << 20, block_size=16)
    try:
        first = llm.generate(requests(images, PROMPTS[:1]), greedy())[0]
        again = llm.generate(requests(images, PROMPTS[:1]), greedy())[0]
        ids = first.prompt_token_ids
        image_at = ids.index(llm.engine.executor.runner.model.image_token_id)
        assert first.num_cached_tokens == 0
        # The hit ends inside the image: its embeddings are spliced in from the middle, on top
        # of the restored state.
        assert image_at < again.num_cached_tokens == (len(ids) - 1) // 16 * 16
        assert [list(o.outputs[0].token_ids) for o in (first, again)] == [hf_ref[0]] * 2
    finally:
        llm.shutdown()


def test_minimax_vl_image_chat_matches(vl_path, images):
    import transformers

    question = "what is it?"
    content = [{"type": "image_pil", "image_pil": images[2]}, {"type": "text", "text": question}]
    tok = transformers.AutoTokenizer.from_pretrained(vl_path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{question}"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    want = hf_greedy(vl_path, [(prompt, [2])], images)
    llm = LLM(str(vl_path), kv_cache_memory=8 << 20)
    try:
        out = llm.chat([{"role": "user", "content": content}], greedy())[0]
        assert out.prompt == prompt
        assert [list(out.outputs[0].token_ids)] == want
    finally:
        llm.shutdown()


def test_worker_checks_tiles_size_and_placeholder_count(vl_path):
    """The worker refuses an image whose tiles, original size or placeholder count disagree
    with the grid the model derives from the size, naming the numbers."""
    from splitserve.worker.models.anyres import num_image_tokens

    llm = LLM(str(vl_path), kv_cache_memory=8 << 20)
    try:
        model = llm.engine.executor.runner.model
        assert model.image_item_error([5, 3, 24, 24], [30, 40], 70) == ""
        assert "yields 70" in model.image_item_error([5, 3, 24, 24], [30, 40], 69)
        assert "the model takes [5, 3, 24, 24]" in model.image_item_error(
            [3, 3, 24, 24], [30, 40], 70
        )
        assert "image_size must be" in model.image_item_error([5, 3, 24, 24], [], 70)
        # A batch-padded tile stack (more tiles than the grid) is accepted and trimmed.
        assert model.image_item_error([5, 3, 24, 24], [30, 60], 52) == ""
        assert num_image_tokens((30, 60), model.pinpoints, 24, 4) == 52
    finally:
        llm.shutdown()
