"""LLaVA-NeXT any-resolution tiling, as MiniMax-VL-01 reads it: the image is resized into the
best of the config's `image_grid_pinpoints` and cut into tiles of the tower's image size, after
one whole-image tile; the tiles' feature maps are stitched into one map, the padding the resize
added is cut off again ("unpad", with MiniMax's integer rounding), and a learned newline
embedding ends every row.

Sizes are (height, width); pinpoints are [height, width] pairs.
"""

from __future__ import annotations

import torch


def select_best_resolution(
    image_size: tuple[int, int], pinpoints: list[list[int]]
) -> tuple[int, int]:
    """The pinpoint that keeps the most of the image's pixels after an aspect-preserving
    downscale into it, the least wasted area breaking ties (first wins)."""
    height, width = image_size
    best, best_kept, best_waste = None, -1, None
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(ph), int(pw)), kept, waste
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


def tile_grid(
    image_size: tuple[int, int], pinpoints: list[list[int]], tile: int
) -> tuple[int, int]:
    """(rows, columns) of tiles the image is cut into (besides the whole-image tile)."""
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    return best_h // tile, best_w // tile


def unpadded_size(image_size: tuple[int, int], map_h: int, map_w: int) -> tuple[int, int]:
    """The stitched feature map's (height, width) once the resize's padding is cut off."""
    height, width = image_size
    if width * map_h > map_w * height:  # wider than the map: padded above and below
        new_h = (height * map_w) // width
        pad = (map_h - new_h) // 2
        return map_h - 2 * pad, map_w
    new_w = (width * map_h) // height
    pad = (map_w - new_w) // 2
    return map_h, map_w - 2 * pad


def num_image_tokens(
    image_size: tuple[int, int], pinpoints: list[list[int]], tile: int, patches_per_side: int
) -> int:
    """Embeddings of one image: the whole-image tile's patches, then the unpadded map with a
    newline per row."""
    rows, cols = tile_grid(image_size, pinpoints, tile)
    h, w = unpadded_size(image_size, rows * patches_per_side, cols * patches_per_side)
    return patches_per_side**2 + h * (w + 1)


def pack_image_features(
    features: torch.Tensor,
    image_size: tuple[int, int],
    pinpoints: list[list[int]],
    tile: int,
    newline: torch.Tensor,
) -> torch.Tensor:
    """features [1 + rows * cols, P * P, D] (the whole-image tile first) -> [tokens, D]."""
    base = features[0]
    if features.shape[0] == 1:
        return torch.cat([base, newline[None].to(base.dtype)])
    side = int(round(base.shape[0] ** 0.5))
    rows, cols = tile_grid(image_size, pinpoints, tile)
    dim = features.shape[-1]
    grid = features[1:].view(rows, cols, side, side, dim)
    # [D, rows * side, cols * side]: tile rows, then the patch rows inside them.
    grid = grid.permute(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)
    h, w = unpadded_size(image_size, rows * side, cols * side)
    top, left = (grid.shape[1] - h) // 2, (grid.shape[2] - w) // 2
    grid = grid[:, top : top + h, left : left + w]
    ends = newline.to(grid.dtype)[:, None, None].expand(dim, h, 1)
    grid = torch.cat([grid, ends], dim=2).flatten(1, 2).t()
    return torch.cat([base, grid])
