"""Encoder-decoder requests on the worker: the encoder runs once per request, and the decoder's
cross-attention keys and values live in a per-request slot until the request leaves.

A slot holds, for every decoder layer, the keys and values the layer's cross-attention
projects from the encoder output: [num_slots, encoder positions, heads, head_dim] tensors
allocated once, when the runner is built, so they are part of the memory the worker measures
before it offers the rest to the paged KV cache (which keeps the decoder's self-attention).

NOTE: why one slot per `max_num_seqs` is enough. A request holds a slot from the step that
sends it to the worker (`new_requests`) until a step lists it in `finished_request_ids`. The
scheduler sends a request only when it admits it to `running` (at most `max_num_seqs` long),
and lists in `finished_request_ids` every request that leaves `running` while known to the
worker: finished, aborted, or preempted (preemption by recompute re-sends the request later,
and its encoder runs again then). The runner forgets the finished ids of a step before it
adds the step's new requests, so the worker's live set after each step's update is a subset
of the scheduler's `running` when it planned that step: never more than `max_num_seqs`. (With
steps planned ahead of results, the worker still applies them in order, and a request that
ended since is listed in the next step planned: the bound holds per step.) A
request the worker cannot place (which would mean that invariant broke) fails alone, with an
error naming the slots.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from splitserve.common import messages as msg
from splitserve.worker.kv_cache import CPU_MEMORY_SHARE, _available_cpu_memory
from splitserve.worker.multimodal import tensor_from_proto

logger = logging.getLogger(__name__)

ENCODER_BATCH = 8
"""Most audio items one encoder forward takes (bounds the encoder's activation memory; the
memory profile runs one batch of this size)."""


@dataclass(slots=True)
class CrossAttentionStep:
    """Which slot each of a step's requests reads, by row of the step's flat token layout."""

    slots: torch.Tensor
    """int64 [S] slot of each request row."""
    query_start_loc: list[int]
    """[S + 1] offsets of each row's tokens in the step."""
    all_single: bool
    """Every row computes one token (decodes): one batched attention for the step."""


_LOCAL = threading.local()


@contextlib.contextmanager
def cross_attention_context(step: CrossAttentionStep) -> Iterator[None]:
    """Make `step` what every cross-attention layer reads while a forward runs."""
    previous = getattr(_LOCAL, "step", None)
    _LOCAL.step = step
    try:
        yield
    finally:
        _LOCAL.step = previous


def cross_attend(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention of the step's queries q [T, H, D] over their requests' slots in one layer's
    key / value [num_slots, L, H, D] (no mask: every encoder position is visible; the scale
    is the model's, applied to q beforehand). Returns [T, H * D]."""
    step: CrossAttentionStep | None = getattr(_LOCAL, "step", None)
    if step is None:
        raise RuntimeError("cross-attention called outside cross_attention_context()")
    t = q.shape[0]
    if step.all_single:
        k = key.index_select(0, step.slots).transpose(1, 2)  # [S, H, L, D]
        v = value.index_select(0, step.slots).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, scale=1.0)
        return out.reshape(t, -1)
    out = q.new_empty(t, q.shape[1], q.shape[2])
    loc = step.query_start_loc
    for i, slot in enumerate(step.slots.tolist()):
        lo, hi = loc[i], loc[i + 1]
        k, v = key[slot].transpose(0, 1), value[slot].transpose(0, 1)  # [H, L, D]
        part = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1), k, v, scale=1.0)
        out[lo:hi] = part.transpose(0, 1)
    return out.reshape(t, -1)


class CrossAttentionSlots:
    """Slots of cross-attention K/V for the live requests of an encoder-decoder model, and the
    audio of requests whose encoder has not run yet."""

    def __init__(
        self, model: torch.nn.Module, num_slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"cross-attention needs at least one slot, got {num_slots}")
        self.model = model
        self.device = device
        self.num_slots = num_slots
        shape = (num_slots, *model.cross_kv_shape)
        self.caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(model.num_decoder_layers)
        ]
        self._free = list(range(num_slots - 1, -1, -1))
        self.slot_of: dict[str, int] = {}
        self._pending: dict[str, torch.Tensor] = {}
        """request id -> input features [mel bins, frames] still to encode."""
        self.num_encoded = 0
        """Requests encoded so far (tests check each is encoded once per admission)."""

    @classmethod
    def fit(
        cls,
        current: CrossAttentionSlots | None,
        model: torch.nn.Module,
        config,
        dtype: torch.dtype,
        device: torch.device,
    ) -> CrossAttentionSlots | None:
        """`current` when it has `config.max_num_seqs` slots, else new slots of that many
        (the old ones released first), bound to the decoder layers; None for a decoder-only
        model. ValueError naming the sizes when they cannot be allocated."""
        if not getattr(model, "is_encoder_decoder", False):
            return None
        # NOTE: refused, not ignored: the encoder-decoder step runs no adapter, and its
        # projections are plain linears that take no quant method.
        if getattr(config, "enable_lora", False):
            raise ValueError(
                f"--enable-lora is not supported with {type(model).__name__} "
                "(an encoder-decoder model)"
            )
        if getattr(model, "quant_config", None) is not None:
            raise ValueError(
                f"quantized {type(model).__name__} checkpoints and --quantization are not supported"
            )
        num_slots = config.max_num_seqs
        if current is not None:
            if current.num_slots == num_slots:
                return current
            if current.slot_of:
                raise RuntimeError("cross-attention slots cannot be resized while in use")
            model.bind_cross_caches(None)
            current.caches.clear()
        per_slot = 2 * model.num_decoder_layers * math.prod(model.cross_kv_shape)
        per_slot *= torch.empty((), dtype=dtype).element_size()
        too_many = (
            f"cannot allocate the cross-attention slots: {num_slots} (max_num_seqs) x "
            f"{per_slot / 2**20:.1f} MiB"
        )
        free = _available_cpu_memory() if device.type == "cpu" else None
        if free is not None and num_slots * per_slot > free * CPU_MEMORY_SHARE:
            # NOTE: a CPU allocation this large may succeed lazily and be killed when touched.
            raise ValueError(
                f"{too_many} is more than {CPU_MEMORY_SHARE:.0%} of the "
                f"{free / 2**30:.1f} GiB available; lower --max-num-seqs"
            )
        try:
            slots = cls(model, num_slots, dtype, device)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            raise ValueError(f"{too_many}; lower --max-num-seqs ({exc})") from None
        model.bind_cross_caches(slots.caches)
        logger.info(
            "cross-attention: %d slots (max_num_seqs) of %.1f MiB", num_slots, per_slot / 2**20
        )
        return slots

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.caches)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def add(self, req: msg.NewRequest) -> str | None:
        """Take a new request's audio and a slot for it; an error message when it cannot."""
        self.remove(req.request_id)  # a reused id must not keep an old slot
        items = req.mm_inputs
        if len(items) != 1 or items[0].modality != "audio":
            kinds = [m.modality for m in items]
            return (
                f"{type(self.model).__name__} takes exactly one audio input per request "
                f"(its encoder input), got {kinds or 'none'}"
            )
        try:
            features = tensor_from_proto(items[0].input_features)
        except ValueError as exc:
            return f"audio 0: {exc}"
        want = list(self.model.feature_shape)
        if list(features.shape) != want:
            return (
                f"audio 0: input_features of shape {list(features.shape)}, the model takes "
                f"{want} ([mel bins, frames])"
            )
        if not self._free:
            return (
                f"no free cross-attention slot: all {self.num_slots} (max_num_seqs) are held "
                "by running requests"
            )
        self.slot_of[req.request_id] = self._free.pop()
        self._pending[req.request_id] = features
        return None

    def remove(self, request_id: str) -> None:
        """Free the request's slot (finished, aborted, preempted or failed)."""
        self._pending.pop(request_id, None)
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    def encode_pending(self) -> None:
        """Run the encoder over the audio of requests added since the last call and fill
        their slots with every decoder layer's cross-attention keys and values."""
        pending = list(self._pending.items())
        self._pending.clear()
        for start in range(0, len(pending), ENCODER_BATCH):
            part = pending[start : start + ENCODER_BATCH]
            features = torch.stack([f for _, f in part]).to(self.device)
            slots = torch.tensor([self.slot_of[rid] for rid, _ in part], device=self.device)
            self._fill(slots, self.model.encode(features))
            self.num_encoded += len(part)

    def _fill(self, slots: torch.Tensor, encoder_out: torch.Tensor) -> None:
        for (key, value), (k, v) in zip(self.caches, self.model.cross_kv(encoder_out), strict=True):
            key.index_copy_(0, slots, k.to(key.dtype))
            value.index_copy_(0, slots, v.to(value.dtype))

    @contextlib.contextmanager
    def run_step(self, req_ids: list[str], counts: np.ndarray) -> Iterator[None]:
        """Encode the audio of new requests, then let the forward inside read the slots of
        the step's rows."""
        self.encode_pending()
        with cross_attention_context(self.step(req_ids, counts)):
            yield

    def warm_up_inputs(self, length: int) -> list[msg.MultiModalInput]:
        """The encoder input of the runner's warm-up request: silence."""
        features = np.zeros(self.model.feature_shape, dtype=np.float32)
        data = msg.TensorData(dtype="float32", shape=list(features.shape), data=features.tobytes())
        return [
            msg.MultiModalInput(
                modality="audio", input_features=data, num_frames=features.shape[1], length=length
            )
        ]

    def step(self, req_ids: list[str], counts: np.ndarray) -> CrossAttentionStep:
        """The slots the step's rows (in the step's order, `counts` tokens each) read."""
        slots = torch.tensor([self.slot_of[r] for r in req_ids], device=self.device)
        loc = [0, *np.cumsum(counts).tolist()]
        return CrossAttentionStep(slots, loc, bool((counts == 1).all()))

    @contextlib.contextmanager
    def profile(self, query_start_loc: list[int]) -> Iterator[None]:
        """For the memory profile: one encoder batch of ENCODER_BATCH items (its activation
        peak), then a forward inside whose rows (`query_start_loc`) all read slot 0."""
        batch = min(ENCODER_BATCH, self.num_slots)
        dtype = self.caches[0][0].dtype
        features = torch.zeros(batch, *self.model.feature_shape, dtype=dtype, device=self.device)
        self.model.encode(features)
        rows = len(query_start_loc) - 1
        slots = torch.zeros(rows, dtype=torch.int64, device=self.device)
        with cross_attention_context(CrossAttentionStep(slots, list(query_start_loc), False)):
            yield
