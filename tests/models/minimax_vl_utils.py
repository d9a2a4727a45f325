"""A tiny random MiniMax-VL-01 checkpoint in the layout vLLM reads (`vision_tower.vision_model.*`,
`multi_modal_projector.*`, `image_newline`, `language_model.model.*`, `language_model.lm_head.*`),
built from transformers' own pieces (CLIP vision model, LLaVA-NeXT projector, MiniMax text
model), with a LLaVA-NeXT processor (any-resolution tiling) for its images.

The config is transformers' `LlavaNextConfig` (the same fields MiniMax-VL-01's config class
has) with the MiniMax text config; `architectures` names MiniMaxVL01ForConditionalGeneration.
The text model is also saved alone beside the checkpoint (`<out>-text`) for the oracle.
"""

from __future__ import annotations

import json
import pathlib

from splitserve.testing.minimax_model import minimax_config

TILE = 24
PATCH = 6
PINPOINTS = [[24, 48], [48, 24], [48, 48]]
"""[height, width] of the grids an image may be resized into (tiles of TILE)."""


def build_minimax_vl(out_dir, tokenizer_dir, seed: int = 0) -> pathlib.Path:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

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
        image_size=TILE,
        patch_size=PATCH,
        projection_dim=32,
    )
    text = minimax_config(len(tok) + 11, block_size=16, mlp_beta_factor=1.2)
    config = transformers.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=PINPOINTS,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    tower = transformers.CLIPVisionModel(vision).eval()
    projector = LlavaNextMultiModalProjector(config).eval()
    newline = torch.randn(text.hidden_size) * 0.5
    with torch.no_grad():  # visible image effects: the default init leaves the tower near zero
        for p in [*tower.parameters(), *projector.parameters()]:
            if p.dim() > 1:
                p.normal_(0, 0.3)
    lm = transformers.MiniMaxForCausalLM(text).eval()
    text_dir = out.parent / f"{out.name}-text"
    lm.save_pretrained(text_dir)  # the checkpoint form of the experts (block_sparse_moe.*)
    tok.save_pretrained(text_dir)
    tensors = {
        f"language_model.{k}": v for k, v in load_file(text_dir / "model.safetensors").items()
    }
    tensors.update({f"vision_tower.{k}": v for k, v in tower.state_dict().items()})
    tensors.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    tensors["image_newline"] = newline
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    config.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    raw["architectures"] = ["MiniMaxVL01ForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    processor = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": TILE},
            crop_size={"height": TILE, "width": TILE},
            image_grid_pinpoints=PINPOINTS,
        ),
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    processor.save_pretrained(out)
    return out
