"""Image inputs on the worker: decode them, encode each once, splice the embeddings in.

A request's images arrive with it (`NewRequest.mm_inputs`): processed pixels as raw bytes and
the prompt span [offset, offset + length) of each image's placeholder tokens. The encoder runs
the first time a step computes any of an image's placeholder positions, and its output is kept
until a step has computed past the span, so a prefill chunk that cuts through an image reuses
it. A prefix-cache hit that starts inside an image still works: the image is encoded then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.common import messages as msg

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_from_proto(t: msg.TensorData) -> torch.Tensor:
    """The tensor of a TensorData (dataclass or message); ValueError when its fields disagree."""
    if t is None:  # a dataclass MultiModalInput without pixel_values (an unset message field)
        t = msg.TensorData()
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {t.dtype!r}; supported: {sorted(_DTYPES)}")
    shape = list(t.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {shape} has a negative dimension")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(t.data) != expected:
        raise ValueError(
            f"tensor of shape {shape} and dtype {t.dtype} needs {expected} bytes, got {len(t.data)}"
        )
    if not expected:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(t.data), dtype=dtype).reshape(shape)


@dataclass(slots=True)
class _Image:
    offset: int
    length: int
    pixel_values: torch.Tensor
    embeds: torch.Tensor | None = None
    """[length, hidden] once encoded; dropped when the prompt is computed past the span."""


class MultiModalInputs:
    """The images of the live requests of one (first) pipeline rank."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.images: dict[str, list[_Image]] = {}
        self.num_encoded = 0
        """Images encoded so far (tests check each is encoded once)."""

    def __len__(self) -> int:
        return len(self.images)

    def add(self, req: msg.NewRequest) -> str | None:
        """Take a new request's images; an error message when they are invalid."""
        self.images.pop(req.request_id, None)
        if not req.mm_inputs:
            return None
        if not getattr(self.model, "supports_images", False):
            return "this model does not take image inputs"
        num_prompt = req.num_prompt_tokens or len(req.token_ids)
        token_ids = np.asarray(req.token_ids, dtype=np.int64)
        want = self.model.num_image_tokens
        images: list[_Image] = []
        end = 0
        for i, item in enumerate(req.mm_inputs):
            if item.modality != "image":
                return f"multimodal input {i}: unsupported modality {item.modality!r}"
            if item.offset < end or item.offset + item.length > num_prompt:
                return (
                    f"image {i}: placeholder span [{item.offset}, {item.offset + item.length}) "
                    f"overlaps another image or leaves the {num_prompt}-token prompt"
                )
            if item.length != want:
                return f"image {i}: {item.length} placeholder tokens, the model yields {want}"
            span = token_ids[item.offset : item.offset + item.length]
            if (span != self.model.image_token_id).any():
                return (
                    f"image {i}: the prompt holds other tokens than the image token "
                    f"{self.model.image_token_id} in [{item.offset}, {item.offset + item.length})"
                )
            try:
                pixels = tensor_from_proto(item.pixel_values)
            except ValueError as exc:
                return f"image {i}: {exc}"
            want_shape = list(self.model.pixel_shape)
            if list(pixels.shape) != want_shape:
                return (
                    f"image {i}: pixel_values of shape {list(pixels.shape)}, the model takes "
                    f"{want_shape} ([channels, height, width])"
                )
            images.append(_Image(item.offset, item.length, pixels))
            end = item.offset + item.length
        self.images[req.request_id] = images
        return None

    def remove(self, request_id: str) -> None:
        self.images.pop(request_id, None)

    def embeddings(
        self,
        req_ids: list[str],
        starts: np.ndarray,
        ends: np.ndarray,
        offsets: np.ndarray,
        input_ids: torch.Tensor,
    ) -> torch.Tensor | None:
        """The step's input embeddings with every scheduled image position filled in, or
        None when the step computes no image position. Row i of the step computes prompt
        positions [starts[i], ends[i]) at flat token offset offsets[i]."""
        spans: list[tuple[_Image, int, int, int]] = []
        for i, rid in enumerate(req_ids):
            for image in self.images.get(rid, ()):
                lo = max(int(starts[i]), image.offset)
                hi = min(int(ends[i]), image.offset + image.length)
                if lo < hi:
                    spans.append((image, lo, hi, int(offsets[i]) + lo - int(starts[i])))
        if not spans:
            return None
        self._encode([image for image, *_ in spans if image.embeds is None])
        embeds = self.model.embed_tokens(input_ids)
        for image, lo, hi, at in spans:
            embeds[at : at + hi - lo] = image.embeds[lo - image.offset : hi - image.offset]
        return embeds

    def _encode(self, pending: list[_Image]) -> None:
        unique = list({id(image): image for image in pending}.values())
        if not unique:
            return
        pixels = torch.stack([image.pixel_values for image in unique]).to(self.device)
        out = self.model.embed_images(pixels)
        for image, embeds in zip(unique, out, strict=True):
            image.embeds = embeds
        self.num_encoded += len(unique)

    def release_computed(self, req_ids: list[str], ends: np.ndarray) -> None:
        """Drop the embeddings of images a step has computed past (a position after the span
        is computed: a deferred last position may still need the span)."""
        for rid, end in zip(req_ids, ends.tolist(), strict=True):
            images = self.images.get(rid)
            if images:
                left = [image for image in images if image.offset + image.length >= end]
                if left:
                    self.images[rid] = left
                else:
                    del self.images[rid]
