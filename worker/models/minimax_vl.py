"""MiniMax-VL-01: a CLIP vision tower, a two-layer projector and a learned `image_newline` in
front of the MiniMax text model (lightning + softmax attention, MoE), with LLaVA-NeXT
any-resolution tiling (worker/models/anyres.py).

Checkpoint names as vLLM reads the MiniMax-VL-01 layout: `vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`, `image_newline`, `language_model.model.*`,
`language_model.lm_head.*`. An image arrives as its tiles ([1 + rows * cols, 3, S, S], the
whole image first) with its original size; each tile runs through the tower and the projector,
and the tiles' features are stitched, unpadded and given a newline per row. The whole model
lives on one rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitserve.worker.models.anyres import num_image_tokens, pack_image_features, tile_grid
from splitserve.worker.models.clip import CLIPVisionTower
from splitserve.worker.models.llava import LLAVA_RENAMES, LlavaMultiModalProjector
from splitserve.worker.models.minimax import MiniMaxForCausalLM
from splitserve.worker.models.multimodal_lm import MultiModalCausalLM

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
"""MiniMax-VL-01's config default."""


class MiniMaxVL01ForConditionalGeneration(MultiModalCausalLM):
    """MiniMax-VL-01 on one rank; `compute_logits` is the text model's lm_head."""

    supports_images = True
    packed_modules = MiniMaxForCausalLM.packed_modules
    checkpoint_ignore = MiniMaxForCausalLM.checkpoint_ignore
    supports_cuda_graphs = False
    renames = LLAVA_RENAMES

    def __init__(
        self,
        config: Any,
        start_layer: int,
        end_layer: int,
        is_first: bool,
        is_last: bool,
        max_positions: int,
    ) -> None:
        super().__init__()
        self.check_one_rank(is_first, is_last, "MiniMax-VL-01")
        self.config = config
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be one layer index, got {layer!r}")
        self.feature_layers = [layer]
        strategy = config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"unsupported vision_feature_select_strategy {strategy!r} for MiniMax-VL-01; "
                "supported: default"
            )
        vc = config.vision_config
        self.tile = vc.image_size
        self.patches_per_side = vc.image_size // vc.patch_size
        self.pinpoints = [list(p) for p in (config.image_grid_pinpoints or DEFAULT_PINPOINTS)]
        bad = [p for p in self.pinpoints if p[0] % self.tile or p[1] % self.tile]
        if bad:
            raise ValueError(
                f"image_grid_pinpoints {bad} are not multiples of the tile size {self.tile}"
            )
        token = getattr(config, "image_token_id", None)
        self.image_token_id = int(token if token is not None else config.image_token_index)
        self.vision_tower = CLIPVisionTower(vc)
        self.multi_modal_projector = LlavaMultiModalProjector(config, 1)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = MiniMaxForCausalLM(
            config.text_config, start_layer, end_layer, True, True, max_positions
        )

    def image_item_error(self, shape: list[int], image_size: list[int], length: int) -> str:
        """Why one image's tiles, size and placeholder count do not fit the model ("" when
        they do)."""
        if len(image_size) != 2 or min(image_size) < 1:
            return f"image_size must be [height, width], got {image_size}"
        rows, cols = tile_grid(tuple(image_size), self.pinpoints, self.tile)
        want = [1 + rows * cols, self.config.vision_config.num_channels, self.tile, self.tile]
        if shape[1:] != want[1:] or shape[0] < want[0]:
            return f"pixel_values of shape {shape}, the model takes {want} for a {image_size} image"
        tokens = num_image_tokens(tuple(image_size), self.pinpoints, self.tile, self.patches_per_side)  # fmt: skip
        if length != tokens:
            return (
                f"{length} placeholder tokens, the model yields {tokens} for a {image_size} image"
            )
        return ""

    def embed_image_items(self, items: list[tuple[torch.Tensor, list[int]]]) -> list[torch.Tensor]:
        """Each image's tiles [>= 1 + rows * cols, 3, S, S] (extra tiles are the processor's
        batch padding) and [height, width] -> its embeddings [tokens, text hidden]."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        counts, tiles = [], []
        for pixels, size in items:
            rows, cols = tile_grid(tuple(size), self.pinpoints, self.tile)
            counts.append(1 + rows * cols)
            tiles.append(pixels[: counts[-1]])
        states = self.vision_tower(torch.cat(tiles).to(dtype), self.feature_layers)[0]
        features = self.multi_modal_projector(states[:, 1:])
        return [
            pack_image_features(f, tuple(size), self.pinpoints, self.tile, self.image_newline)
            for f, (_, size) in zip(features.split(counts), items, strict=True)
        ]
