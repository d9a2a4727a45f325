"""A tiny random LLaVA-1.5 checkpoint (CLIP vision tower + Llama), saved by transformers."""

from __future__ import annotations

import pathlib
import shutil

IMAGE_SIZE = 30
PATCH_SIZE = 6
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # "default" strategy: the CLS token is dropped


def build_llava(out_dir, tokenizer_dir, seed: int = 0) -> pathlib.Path:
    """Save a tiny LLaVA (3 CLIP layers reading layer -2, 2 Llama layers) with an `<image>`
    token added to the tokenizer of `tokenizer_dir` and a CLIP image processor."""
    import torch
    import transformers

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<image>"], special_tokens=True)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(tok) + 23,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # visible image effects: the default init leaves the tower near zero
        for name, p in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                if p.dim() > 1:
                    p.normal_(0, 0.3)
    model.save_pretrained(out)
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    processor.save_pretrained(out)
    return out


def random_image(seed: int, size=(40, 34)):
    """An RGB PIL image of random pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def copy_tokenizer(src, dst) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (pathlib.Path(src) / name).exists():
            shutil.copy(pathlib.Path(src) / name, pathlib.Path(dst) / name)


def transparent_image(mode: str, seed: int, size=(40, 34)):
    """A PIL image with transparency whose hidden colours differ from what shows on white:
    "RGBA" and "LA" with random alpha, "P" with one palette entry marked transparent."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 2), dtype=np.uint8), "LA")
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 16, (h, w), dtype=np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
        image.info["transparency"] = 3
        return image
    raise ValueError(mode)
