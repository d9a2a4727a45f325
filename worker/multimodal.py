"""Image and audio inputs on the worker: decode them, encode each once, splice the embeddings in.

A request's items arrive with it (`NewRequest.mm_inputs`): processed pixels (images) or log-mel
features (audio) as raw bytes, and the prompt span [offset, offset + length) of each item's
placeholder tokens. The encoder runs the first time a step computes any of an item's
placeholder positions, and its output is kept until a step has computed past the span, so a
prefill chunk that cuts through an item reuses it. A prefix-cache hit that starts inside an
item still works: the item is encoded then.
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
    if t is None:  # a dataclass MultiModalInput without this tensor (an unset message field)
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
class _Item:
    modality: str
    offset: int
    length: int
    data: torch.Tensor
    """Images: pixel_values [C, H, W]; audio: input_features [mel bins, frames]."""
    num_frames: int = 0
    """Audio: the frames of `data` that hold audio."""
    embeds: torch.Tensor | None = None
    """[length, hidden] once encoded; dropped when the prompt is computed past the span."""


class MultiModalInputs:
    """The images of the live requests of one (first) pipeline rank."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.images: dict[str, list[_Item]] = {}
        self.num_encoded = 0
        """Images encoded so far (tests check each is encoded once)."""

    def __len__(self) -> int:
        return len(self.images)

    def add(self, req: msg.NewRequest) -> str | None:
        """Take a new request's items; an error message when they are invalid."""
        self.images.pop(req.request_id, None)
        if not req.mm_inputs:
            return None
        num_prompt = req.num_prompt_tokens or len(req.token_ids)
        token_ids = np.asarray(req.token_ids, dtype=np.int64)
        items: list[_Item] = []
        end = 0
        for i, mm in enumerate(req.mm_inputs):
            if mm.modality not in ("image", "audio"):
                return f"multimodal input {i}: unsupported modality {mm.modality!r}"
            kind = mm.modality
            if not getattr(
                self.model, f"supports_{kind}s" if kind == "image" else "supports_audio", False
            ):
                return f"this model does not take {kind} inputs"
            if mm.offset < end or mm.offset + mm.length > num_prompt:
                return (
                    f"{kind} {i}: placeholder span [{mm.offset}, {mm.offset + mm.length}) "
                    f"overlaps another item or leaves the {num_prompt}-token prompt"
                )
            item, error = (self._image if kind == "image" else self._audio)(i, mm)
            if error:
                return error
            token = self.model.image_token_id if kind == "image" else self.model.audio_token_id
            span = token_ids[mm.offset : mm.offset + mm.length]
            if (span != token).any():
                return (
                    f"{kind} {i}: the prompt holds other tokens than the {kind} token "
                    f"{token} in [{mm.offset}, {mm.offset + mm.length})"
                )
            items.append(item)
            end = mm.offset + mm.length
        self.images[req.request_id] = items
        return None

    def _image(self, i: int, mm: msg.MultiModalInput) -> tuple[_Item | None, str]:
        want = self.model.num_image_tokens
        if mm.length != want:
            return None, f"image {i}: {mm.length} placeholder tokens, the model yields {want}"
        try:
            pixels = tensor_from_proto(mm.pixel_values)
        except ValueError as exc:
            return None, f"image {i}: {exc}"
        want_shape = list(self.model.pixel_shape)
        if list(pixels.shape) != want_shape:
            return None, (
                f"image {i}: pixel_values of shape {list(pixels.shape)}, the model takes "
                f"{want_shape} ([channels, height, width])"
            )
        return _Item("image", mm.offset, mm.length, pixels), ""

    def _audio(self, i: int, mm: msg.MultiModalInput) -> tuple[_Item | None, str]:
        try:
            features = tensor_from_proto(mm.input_features)
        except ValueError as exc:
            return None, f"audio {i}: {exc}"
        want_shape = list(self.model.feature_shape)
        if list(features.shape) != want_shape:
            return None, (
                f"audio {i}: input_features of shape {list(features.shape)}, the model takes "
                f"{want_shape} ([mel bins, frames])"
            )
        if not 0 < mm.num_frames <= want_shape[1]:
            return None, f"audio {i}: num_frames {mm.num_frames} outside [1, {want_shape[1]}]"
        want = self.model.num_audio_tokens(mm.num_frames)
        if mm.length != want:
            return None, (
                f"audio {i}: {mm.length} placeholder tokens, the model yields {want} for "
                f"{mm.num_frames} frames"
            )
        return _Item("audio", mm.offset, mm.length, features, mm.num_frames), ""

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
        spans: list[tuple[_Item, int, int, int]] = []
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

    def _encode(self, pending: list[_Item]) -> None:
        unique = list({id(item): item for item in pending}.values())
        images = [item for item in unique if item.modality == "image"]
        audio = [item for item in unique if item.modality == "audio"]
        if images:
            pixels = torch.stack([item.data for item in images]).to(self.device)
            for item, embeds in zip(images, self.model.embed_images(pixels), strict=True):
                item.embeds = embeds
        if audio:
            features = torch.stack([item.data for item in audio]).to(self.device)
            frames = torch.tensor([item.num_frames for item in audio])
            for item, embeds in zip(audio, self.model.embed_audio(features, frames), strict=True):
                item.embeds = embeds
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
