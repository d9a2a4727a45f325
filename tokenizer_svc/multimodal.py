"""Image inputs before the engine: the model's own processor expands the prompt and makes pixels.

`ImagePreprocessor` runs the Hugging Face processor of the model folder (`AutoProcessor`: the
tokenizer plus an image processor) on a prompt and its images. The processor replaces each
image placeholder of the prompt (LLaVA's `<image>`) with as many placeholder tokens as the
encoder yields for the image; each image's span of those tokens, its processed pixels (raw
bytes + dtype + shape, never pickle) and a SHA-256 of them go to the engine as a
`MultiModalInput`. The hash keys the prefix cache: the same image after the same text hits it,
another image does not.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
from dataclasses import dataclass

import numpy as np

from splitserve.protos import common_pb2


def tensor_proto(array: np.ndarray) -> common_pb2.TensorData:
    """A float32 / float16 array as TensorData (little-endian, C order)."""
    if array.dtype not in (np.float32, np.float16):
        array = array.astype(np.float32)
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    return common_pb2.TensorData(
        dtype=str(array.dtype.name), shape=list(array.shape), data=array.tobytes()
    )


def image_hash(t: common_pb2.TensorData) -> bytes:
    """SHA-256 of a processed image: dtype, shape and bytes."""
    h = hashlib.sha256(b"splitserve-image-v1")
    h.update(t.dtype.encode() + b"\x00")
    h.update(np.asarray(t.shape, dtype="<i8").tobytes())
    h.update(t.data)
    return h.digest()


@dataclass
class ProcessedPrompt:
    """A prompt after the processor: expanded token ids and its images for the engine."""

    prompt: str
    token_ids: list[int]
    mm_inputs: list[common_pb2.MultiModalInput]


class ImagePreprocessor:
    """The processor of one model folder, for prompts with images."""

    def __init__(self, path: str, image_token_id: int, limits: dict[str, int]) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        if getattr(self.processor, "image_processor", None) is None:
            raise ValueError(f"the model at {path} has no image processor")
        self.image_token_id = image_token_id
        self.image_token = self.processor.tokenizer.convert_ids_to_tokens(image_token_id)
        self.limits = limits

    def check_count(self, num_images: int) -> None:
        """ValueError when a prompt carries more images than the limit."""
        limit = self.limits["image"]
        if num_images > limit:
            raise ValueError(
                f"the prompt carries {num_images} images, more than the limit of {limit} "
                "(--limit-mm-per-prompt)"
            )

    def process(
        self, prompt: str, images: list, add_special_tokens: bool = True
    ) -> ProcessedPrompt:
        """Expand `prompt` (with one image placeholder per image) and process `images` (PIL
        images); ValueError naming the problem. Chat prompts pass add_special_tokens=False
        (the template writes BOS itself)."""
        self.check_count(len(images))
        found = prompt.count(self.image_token)
        if found != len(images):
            raise ValueError(
                f"the prompt holds {found} image placeholders ({self.image_token!r}) for "
                f"{len(images)} images: put one placeholder where each image goes"
            )
        try:
            out = self.processor(
                text=[prompt],
                images=images or None,
                return_tensors="np",
                padding=False,
                add_special_tokens=add_special_tokens,
            )
        except Exception as exc:  # the processor's own message names the problem
            raise ValueError(f"the model's processor refused the input: {exc}") from exc
        ids = [int(t) for t in np.asarray(out["input_ids"])[0].tolist()]
        if not images:
            return ProcessedPrompt(prompt, ids, [])
        pixels = np.asarray(out["pixel_values"])
        spans = self._spans(ids, len(images))
        mm_inputs = []
        for (offset, length), pix in zip(spans, pixels, strict=True):
            t = tensor_proto(pix)
            mm_inputs.append(
                common_pb2.MultiModalInput(
                    modality="image",
                    pixel_values=t,
                    hash=image_hash(t),
                    offset=offset,
                    length=length,
                )
            )
        return ProcessedPrompt(prompt, ids, mm_inputs)

    def _spans(self, ids: list[int], num_images: int) -> list[tuple[int, int]]:
        """(offset, length) of each image's placeholder tokens (each image gets the same
        number: adjacent images' runs are split evenly)."""
        positions = np.flatnonzero(np.asarray(ids) == self.image_token_id)
        if positions.size == 0 or positions.size % num_images:
            raise ValueError(
                f"the processor left {positions.size} image tokens for {num_images} images"
            )
        k = positions.size // num_images
        spans = []
        for i in range(num_images):
            run = positions[i * k : (i + 1) * k]
            if run[-1] - run[0] != k - 1:
                raise ValueError("an image's placeholder tokens are not contiguous")
            spans.append((int(run[0]), k))
        return spans


def image_token_id_of(path: pathlib.Path) -> int | None:
    """The image placeholder token id of the model folder's config.json (LLaVA's
    image_token_index), or None for a model that takes no images."""
    config = path / "config.json"
    if not config.exists():
        return None
    raw = json.loads(config.read_text())
    value = raw.get("image_token_id", raw.get("image_token_index"))
    return int(value) if value is not None else None


def load_image_preprocessor(path: pathlib.Path | None, limits: dict[str, int]):
    """The ImagePreprocessor of a model folder whose config names an image token and which
    ships a processor config; None for a text-only model."""
    if path is None:
        return None
    token_id = image_token_id_of(path)
    has_processor = any(
        (path / name).exists() for name in ("processor_config.json", "preprocessor_config.json")
    )
    if token_id is None or not has_processor:
        return None
    return ImagePreprocessor(str(path), token_id, limits)


def decode_images(blobs: list[bytes], max_pixels: int) -> list:
    """Image files -> RGB PIL images; ValueError naming the image when one is not an image
    or has more than `max_pixels` pixels (checked from the header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for i, blob in enumerate(blobs):
        try:
            image = Image.open(io.BytesIO(blob))
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(
                    f"image {i} is {width}x{height} = {width * height} pixels, more than the "
                    f"limit of {max_pixels} (--max-image-pixels)"
                )
            images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ValueError(f"image {i} could not be decoded as an image: {exc}") from None
    return images
