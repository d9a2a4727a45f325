"""Image and audio inputs on the worker: decode them, encode each once, splice the embeddings in.

A request's items arrive with it (`NewRequest.mm_inputs`): processed pixels (images) or log-mel
features (audio) as raw bytes, the prompt span [offset, offset + length) of each item's
placeholder tokens, and the item's hash. The encoder runs when a step computes any of an
item's placeholder positions and no output for its hash is held; outputs are kept by hash
until the scheduler evicts them (`StepRequest.encoder_evictions`, its encoder cache), so a
prefill chunk that cuts through an item, and a later request with the same image or clip,
reuse it. A prefix-cache hit that starts inside an item still works: the item is encoded then.
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
    hash: bytes = b""
    """The processed input's SHA-256: the encoder cache key."""
    num_frames: int = 0
    """Audio: the frames of `data` that hold audio."""
    image_size: tuple[int, ...] = ()
    """Any-resolution images: the original (height, width); `data` is then its tiles."""


_MODALITIES = {
    # modality: (the model's flag, its placeholder token id, the item's tensor field, the
    # model's shape for it, what the shape's dimensions are)
    "image": (
        "supports_images",
        "image_token_id",
        "pixel_values",
        "pixel_shape",
        "[channels, height, width]",
    ),
    "audio": (
        "supports_audio",
        "audio_token_id",
        "input_features",
        "feature_shape",
        "[mel bins, frames]",
    ),
}


class MultiModalInputs:
    """The images and audio of the live requests of one (first) pipeline rank."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.items: dict[str, list[_Item]] = {}
        self.cache: dict[bytes, torch.Tensor] = {}
        """Encoder outputs [length, hidden] by item hash, until the scheduler evicts them."""
        self.num_encoded = 0
        """Items encoded so far (tests check each is encoded once)."""

    def __len__(self) -> int:
        return len(self.items)

    def add(self, req: msg.NewRequest) -> str | None:
        """Take a new request's items; an error message when they are invalid."""
        self.items.pop(req.request_id, None)
        if not req.mm_inputs:
            return None
        num_prompt = req.num_prompt_tokens or len(req.token_ids)
        token_ids = np.asarray(req.token_ids, dtype=np.int64)
        items: list[_Item] = []
        end = 0
        for i, mm in enumerate(req.mm_inputs):
            kind = mm.modality
            if kind not in _MODALITIES:
                return f"multimodal input {i}: unsupported modality {kind!r}"
            supports, token_attr, field, shape_attr, dims = _MODALITIES[kind]
            if not getattr(self.model, supports, False):
                return f"this model does not take {kind} inputs"
            if mm.offset < end or mm.offset + mm.length > num_prompt:
                return (
                    f"{kind} {i}: placeholder span [{mm.offset}, {mm.offset + mm.length}) "
                    f"overlaps another item or leaves the {num_prompt}-token prompt"
                )
            try:
                data = tensor_from_proto(getattr(mm, field))
            except ValueError as exc:
                return f"{kind} {i}: {exc}"
            anyres = getattr(self.model, "image_item_error", None) if kind == "image" else None
            if anyres is not None:
                # NOTE: tiled images vary in shape and token count with the original size.
                error = anyres(list(data.shape), list(mm.image_size), mm.length)
                if error:
                    return f"{kind} {i}: {error}"
            else:
                want_shape = list(getattr(self.model, shape_attr))
                if list(data.shape) != want_shape:
                    return (
                        f"{kind} {i}: {field} of shape {list(data.shape)}, the model takes "
                        f"{want_shape} ({dims})"
                    )
                error = self._check_length(i, mm, want_shape)
                if error:
                    return error
            token = getattr(self.model, token_attr)
            span = token_ids[mm.offset : mm.offset + mm.length]
            if (span != token).any():
                return (
                    f"{kind} {i}: the prompt holds other tokens than the {kind} token "
                    f"{token} in [{mm.offset}, {mm.offset + mm.length})"
                )
            items.append(
                _Item(
                    kind, mm.offset, mm.length, data, mm.hash, mm.num_frames, tuple(mm.image_size)
                )
            )
            end = mm.offset + mm.length
        self.items[req.request_id] = items
        return None

    def _check_length(self, i: int, mm: msg.MultiModalInput, shape: list[int]) -> str:
        """An error unless the item's span has as many tokens as the encoder yields for it."""
        if mm.modality == "image":
            want = self.model.num_image_tokens
            if mm.length != want:
                return f"image {i}: {mm.length} placeholder tokens, the model yields {want}"
            return ""
        if not 0 < mm.num_frames <= shape[1]:
            return f"audio {i}: num_frames {mm.num_frames} outside [1, {shape[1]}]"
        want = self.model.num_audio_tokens(mm.num_frames)
        if mm.length != want:
            return (
                f"audio {i}: {mm.length} placeholder tokens, the model yields {want} for "
                f"{mm.num_frames} frames"
            )
        return ""

    def remove(self, request_id: str) -> None:
        self.items.pop(request_id, None)

    def evict(self, hashes: list[bytes]) -> None:
        """Drop encoder outputs the scheduler's encoder cache evicted."""
        for h in hashes:
            self.cache.pop(h, None)

    def embeddings(
        self,
        req_ids: list[str],
        starts: np.ndarray,
        ends: np.ndarray,
        offsets: np.ndarray,
        input_ids: torch.Tensor,
    ) -> torch.Tensor | None:
        """The step's input embeddings with every scheduled image or audio position filled
        in, or None when the step computes no such position. Row i of the step computes prompt
        positions [starts[i], ends[i]) at flat token offset offsets[i]."""
        spans: list[tuple[_Item, int, int, int]] = []
        for i, rid in enumerate(req_ids):
            for item in self.items.get(rid, ()):
                lo = max(int(starts[i]), item.offset)
                hi = min(int(ends[i]), item.offset + item.length)
                if lo < hi:
                    spans.append((item, lo, hi, int(offsets[i]) + lo - int(starts[i])))
        if not spans:
            return None
        cache = self.cache
        self._encode([item for item, *_ in spans if item.hash not in cache])
        embeds = self.model.embed_tokens(input_ids)
        for item, lo, hi, at in spans:
            embeds[at : at + hi - lo] = cache[item.hash][lo - item.offset : hi - item.offset]
        return embeds

    def _encode(self, pending: list[_Item]) -> None:
        unique = list({item.hash: item for item in pending}.values())
        images = [item for item in unique if item.modality == "image"]
        audio = [item for item in unique if item.modality == "audio"]
        if images and hasattr(self.model, "embed_image_items"):
            tiled = [(item.data.to(self.device), list(item.image_size)) for item in images]
            for item, embeds in zip(images, self.model.embed_image_items(tiled), strict=True):
                self.cache[item.hash] = embeds
        elif images:
            pixels = torch.stack([item.data for item in images]).to(self.device)
            for item, embeds in zip(images, self.model.embed_images(pixels), strict=True):
                self.cache[item.hash] = embeds
        if audio:
            features = torch.stack([item.data for item in audio]).to(self.device)
            frames = torch.tensor([item.num_frames for item in audio])
            for item, embeds in zip(audio, self.model.embed_audio(features, frames), strict=True):
                self.cache[item.hash] = embeds
        self.num_encoded += len(unique)

    def release_computed(self, req_ids: list[str], ends: np.ndarray) -> None:
        """Drop the embeddings of items a step has computed past (a position after the span
        is computed: a deferred last position may still need the span)."""
        for rid, end in zip(req_ids, ends.tolist(), strict=True):
            items = self.items.get(rid)
            if items:
                left = [item for item in items if item.offset + item.length >= end]
                if left:
                    self.items[rid] = left
                else:
                    del self.items[rid]
