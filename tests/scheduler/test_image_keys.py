"""Images in the prefix-cache keys: a block that covers an image's placeholder tokens is keyed
by the image's hash too, so prompts share it only when their images are the same.

The keys are recomputed here from the documented formula with hashlib (per image touching the
block: int32 -2, its offset as uint32, its 32-byte hash; after the salt, before the tokens).
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from splitserve.common import messages as msg
from splitserve.scheduler.scheduler import RequestRejected

from .utils import cached_keys, gen_request, make_engine

BS = 4
IMAGE = 900  # the placeholder token id
# 6 text tokens, 5 placeholder tokens [6, 11), 7 text tokens: blocks 1 and 2 touch the image.
PROMPT = list(range(300, 306)) + [IMAGE] * 5 + list(range(310, 317))
SPAN = (6, 5)


def image(digest: bytes, offset: int = SPAN[0], length: int = SPAN[1]):
    return msg.MultiModalInput(modality="image", hash=digest, offset=offset, length=length)


def chain(tokens: list[int], images: list[tuple[int, int, bytes]]) -> list[bytes]:
    parent = hashlib.sha256(b"splitserve-prefix-cache-v1").digest()
    keys = []
    for i in range(len(tokens) // BS):
        data = parent
        for offset, length, digest in images:
            if offset < (i + 1) * BS and offset + length > i * BS:
                data += struct.pack("<iI", -2, offset) + digest
        data += struct.pack(f"<{BS}i", *tokens[i * BS : (i + 1) * BS])
        parent = hashlib.sha256(data).digest()
        keys.append(parent)
    return keys


def run_one(engine, rid: str, digest: bytes) -> tuple[list[int], int]:
    """Run one request with one image alone: (output tokens, cached prompt tokens)."""
    req = gen_request(rid, PROMPT, 2)
    req.mm_inputs.append(image(digest))
    engine.scheduler.add_request(req)
    out, cached = [], None
    while engine.has_work:
        for o in engine.step():
            out.extend(o.token_ids)
            if cached is None:
                cached = o.num_cached_tokens
    return out, cached


def test_same_image_hits_other_image_shares_only_text_blocks():
    engine, ex = make_engine(num_blocks=64, block_size=BS)
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    out_a, cached_a = run_one(engine, "a1", a)
    out_a2, cached_a2 = run_one(engine, "a2", a)
    out_b, cached_b = run_one(engine, "b1", b)
    assert cached_a == 0 and cached_a2 == 16  # 4 full blocks of 18 tokens (one left to compute)
    assert cached_b == 4  # block 0 is text only; block 1 touches the other image
    assert out_a == out_a2
    keys = set(cached_keys(engine))
    computed = PROMPT + out_a[:1]
    key_a, key_b = chain(computed, [(*SPAN, a)]), chain(computed, [(*SPAN, b)])
    assert key_a[0] == key_b[0] and all(x != y for x, y in zip(key_a[1:], key_b[1:]))
    assert set(key_a) | set(key_b) <= keys
    # The workers got each request's image with it.
    sent = {m.request_id: [i.hash for i in m.mm_inputs] for s in ex.steps for m in s.new_requests}
    assert sent == {"a1": [a], "a2": [a], "b1": [b]}


@pytest.mark.parametrize(
    "item, match",
    [
        (image(b"x" * 32, offset=16, length=5), "inside the 18-token prompt"),
        (image(b"x" * 32, length=0), "non-empty"),
        (image(b"short"), "32-byte"),
    ],
)
def test_bad_image_spans_are_rejected(item, match):
    engine, _ = make_engine(num_blocks=64, block_size=BS)
    req = gen_request("r", PROMPT, 2)
    req.mm_inputs.append(item)
    with pytest.raises(RequestRejected, match=match) as info:
        engine.scheduler.add_request(req)
    assert info.value.code == "INVALID_ARGUMENT"


def test_overlapping_images_are_rejected():
    engine, _ = make_engine(num_blocks=64, block_size=BS)
    req = gen_request("r", PROMPT, 2)
    req.mm_inputs.extend([image(b"x" * 32, 6, 3), image(b"y" * 32, 8, 3)])
    with pytest.raises(RequestRejected, match="after the previous image"):
        engine.scheduler.add_request(req)
