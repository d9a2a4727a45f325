"""Image inputs before the engine: the model's own processor expands the prompt and makes pixels.

`ImagePreprocessor` runs the Hugging Face processor of the model folder (`AutoProcessor`: the
tokenizer plus an image processor) on a prompt and its images. The processor replaces each
image placeholder of the prompt (LLaVA's `<image>`) with as many placeholder tokens as the
encoder yields for the image; each image's span of those tokens, its processed pixels (raw
bytes + dtype + shape, never pickle) and a SHA-256 of them go to the engine as a
`MultiModalInput`. The hash keys the prefix cache: the same image after the same text hits it,
another image does not.

The preprocessor cache (vLLM's `--mm-processor-cache-gb`; `--disable-mm-preprocessor-cache`
turns it off) keeps each processed image by the SHA-256 of its file bytes, LRU within a byte
budget. When every image of a prompt is cached, neither decoding nor the image processor run:
each placeholder is expanded to the image's token count the processor gave the first time, as
LLaVA's processor does, and the text tokenized. A prompt with any new image goes through the
processor whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import threading
from collections import OrderedDict
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


def image_hash(t: common_pb2.TensorData, image_size: list[int] | None = None) -> bytes:
    """SHA-256 of a processed image: dtype, shape and bytes (and, for tiled images, the
    original size the tiles are unpadded to)."""
    h = hashlib.sha256(b"splitserve-image-v1")
    h.update(t.dtype.encode() + b"\x00")
    h.update(np.asarray(t.shape, dtype="<i8").tobytes())
    h.update(t.data)
    if image_size:
        h.update(b"size\x00" + np.asarray(image_size, dtype="<i8").tobytes())
    return h.digest()


@dataclass
class ProcessedPrompt:
    """A prompt after the processor: expanded token ids and its images for the engine."""

    prompt: str
    token_ids: list[int]
    mm_inputs: list[common_pb2.MultiModalInput]


class ProcessedImageCache:
    """Processed images (MultiModalInput without a place in the prompt) by the SHA-256 of
    their file bytes; least recently used evicted past `max_bytes`. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[bytes, common_pb2.MultiModalInput] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get_all(self, keys: list[bytes]) -> list[common_pb2.MultiModalInput] | None:
        """Every key's item (marked recently used), or None unless all are cached."""
        with self._lock:
            items = [self._items.get(k) for k in keys]
            if any(item is None for item in items):
                self.misses += 1
                return None
            for k in keys:
                self._items.move_to_end(k)
            self.hits += 1
            return items

    def put(self, key: bytes, item: common_pb2.MultiModalInput) -> None:
        size = len(item.pixel_values.data)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= len(old.pixel_values.data)
            self._items[key] = item
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.nbytes -= len(evicted.pixel_values.data)


class ImagePreprocessor:
    """The processor of one model folder, for prompts with images."""

    def __init__(
        self,
        path: str,
        image_token_id: int,
        limits: dict[str, int],
        cache: ProcessedImageCache | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoProcessor

        # A processor shipped as the model's own code (MiniMax-VL-01's) loads only with
        # --trust-remote-code, as the model's config does.
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(self.processor, "image_processor", None) is None:
            raise ValueError(f"the model at {path} has no image processor")
        self.image_token_id = image_token_id
        self.image_token = self.processor.tokenizer.convert_ids_to_tokens(image_token_id)
        self.limits = limits
        self.cache = cache
        """Processed images by file hash; None without the preprocessor cache."""

    def process_files(
        self, prompt: str, blobs: list[bytes], max_pixels: int, add_special_tokens: bool = True
    ) -> ProcessedPrompt:
        """`process` for image files, through the preprocessor cache when there is one."""
        self.check_count(len(blobs))
        keys = [hashlib.sha256(b"file\x00" + blob).digest() for blob in blobs]
        return self._process_cached(
            prompt, keys, lambda: decode_images(blobs, max_pixels), add_special_tokens
        )

    def process_images(
        self, prompt: str, images: list, add_special_tokens: bool = True
    ) -> ProcessedPrompt:
        """`process` for PIL images, through the preprocessor cache when there is one (keyed
        by mode, size and pixels)."""
        self.check_count(len(images))
        keys = []
        for image in images:
            h = hashlib.sha256(f"pil\x00{image.mode}\x00{image.size}\x00".encode())
            h.update(image.tobytes())
            keys.append(h.digest())
        return self._process_cached(prompt, keys, lambda: images, add_special_tokens)

    def _process_cached(self, prompt, keys, load, add_special_tokens) -> ProcessedPrompt:
        cached = self.cache.get_all(keys) if self.cache is not None and keys else None
        if cached is not None:
            return self._expand(prompt, cached, add_special_tokens)
        out = self.process(prompt, load(), add_special_tokens)
        if self.cache is not None:
            for key, item in zip(keys, out.mm_inputs, strict=True):
                stored = common_pb2.MultiModalInput()
                stored.CopyFrom(item)
                stored.offset = 0
                self.cache.put(key, stored)
        return out

    def _expand(
        self, prompt: str, items: list[common_pb2.MultiModalInput], add_special_tokens: bool
    ) -> ProcessedPrompt:
        """The processor's expansion without it: each placeholder becomes its image's
        (cached) number of image tokens, then the text is tokenized."""
        self._check_placeholders(prompt, len(items))
        pieces = prompt.split(self.image_token)
        text = pieces[0] + "".join(
            self.image_token * item.length + piece
            for item, piece in zip(items, pieces[1:], strict=True)
        )
        ids = list(
            self.processor.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        )
        spans = self._spans(ids, len(items), [item.length for item in items])
        mm_inputs = []
        for (offset, _), item in zip(spans, items, strict=True):
            placed = common_pb2.MultiModalInput()
            placed.CopyFrom(item)
            placed.offset = offset
            mm_inputs.append(placed)
        return ProcessedPrompt(prompt, ids, mm_inputs)

    def _check_placeholders(self, prompt: str, num_images: int) -> None:
        found = prompt.count(self.image_token)
        if found != num_images:
            raise ValueError(
                f"the prompt holds {found} image placeholders ({self.image_token!r}) for "
                f"{num_images} images: put one placeholder where each image goes"
            )

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
        self._check_placeholders(prompt, len(images))
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
        # Any-resolution processors (LLaVA-NeXT) give each image's tiles and original size.
        sizes = out.get("image_sizes")
        sizes = [[]] * len(images) if sizes is None else np.asarray(sizes).tolist()
        # NOTE: tiled images are not all the same length: counted, not split evenly.
        lengths = None if not sizes[0] else self._tile_token_counts(ids, len(images))
        spans = self._spans(ids, len(images), lengths)
        mm_inputs = []
        for (offset, length), pix, size in zip(spans, pixels, sizes, strict=True):
            if size:
                pix = drop_padding_tiles(pix)
            t = tensor_proto(pix)
            mm_inputs.append(
                common_pb2.MultiModalInput(
                    modality="image",
                    pixel_values=t,
                    hash=image_hash(t, size),
                    offset=offset,
                    length=length,
                    image_size=[int(v) for v in size],
                )
            )
        return ProcessedPrompt(prompt, ids, mm_inputs)

    def _tile_token_counts(self, ids: list[int], num_images: int) -> list[int]:
        """Each image's placeholder count, from the runs of image tokens (images of different
        sizes expand to different counts; adjacent images would merge into one run)."""
        runs, prev = [], -2
        for pos in np.flatnonzero(np.asarray(ids) == self.image_token_id).tolist():
            if pos == prev + 1:
                runs[-1] += 1
            else:
                runs.append(1)
            prev = pos
        if len(runs) != num_images:
            raise ValueError(
                f"the processor left {len(runs)} runs of image tokens for {num_images} images: "
                "put text between adjacent images of this model"
            )
        return runs

    def _spans(
        self, ids: list[int], num_images: int, lengths: list[int] | None = None
    ) -> list[tuple[int, int]]:
        return placeholder_spans(ids, self.image_token_id, num_images, "image", lengths)


def drop_padding_tiles(tiles: np.ndarray) -> np.ndarray:
    """An image's tiles without the all-zero ones the processor appends to batch images of
    different grids (a normalised tile is never exactly zero), so the image's bytes and hash
    do not depend on the other images of its prompt."""
    keep = tiles.shape[0]
    while keep > 1 and not tiles[keep - 1].any():
        keep -= 1
    return tiles[:keep]


def placeholder_spans(
    ids: list[int], token_id: int, num_items: int, kind: str, lengths: list[int] | None = None
) -> list[tuple[int, int]]:
    """(offset, length) of each item's run of placeholder tokens `token_id`, in order:
    `lengths` each, or all the same number (adjacent items' runs split evenly)."""
    positions = np.flatnonzero(np.asarray(ids) == token_id)
    if lengths is None:
        if positions.size == 0 or positions.size % num_items:
            raise ValueError(
                f"the processor left {positions.size} {kind} tokens for {num_items} {kind}s"
            )
        lengths = [positions.size // num_items] * num_items
    if positions.size != sum(lengths):
        raise ValueError(
            f"the prompt holds {positions.size} {kind} tokens, its {kind}s need {sum(lengths)}"
        )
    spans, start = [], 0
    for k in lengths:
        run = positions[start : start + k]
        if run[-1] - run[0] != k - 1:
            raise ValueError(f"an {kind}'s placeholder tokens are not contiguous")
        spans.append((int(run[0]), k))
        start += k
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


def load_image_preprocessor(
    path: pathlib.Path | None,
    limits: dict[str, int],
    cache_bytes: int = 0,
    trust_remote_code: bool = False,
):
    """The ImagePreprocessor of a model folder whose config names an image token and which
    ships a processor config (with a preprocessor cache of `cache_bytes`, 0 for none); None
    for a text-only model."""
    if path is None:
        return None
    token_id = image_token_id_of(path)
    has_processor = any(
        (path / name).exists() for name in ("processor_config.json", "preprocessor_config.json")
    )
    if token_id is None or not has_processor:
        return None
    cache = ProcessedImageCache(cache_bytes) if cache_bytes > 0 else None
    return ImagePreprocessor(str(path), token_id, limits, cache, trust_remote_code)


def to_rgb(image):
    """A PIL image as RGB, transparency composited onto white first, as transformers' image
    processors do (its `convert_to_rgb`, which is what this calls): `image.convert("RGB")`
    alone drops the alpha channel, so a transparent pixel would keep its hidden colour and the
    model would see a different picture than under transformers or vLLM."""
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


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
            images.append(to_rgb(image))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ValueError(f"image {i} could not be decoded as an image: {exc}") from None
    return images
