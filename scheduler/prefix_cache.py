"""Block hashes for prefix caching: a SHA-256 chain over full blocks of token ids.

hash(block i) = SHA-256(hash(block i-1) || extra key || token ids of block i as int32 LE).
The chain makes a block's identity depend on everything before it, so two tenants share a
block only when their whole prefix up to it is identical. The extra key keeps prefixes of
different LoRA adapters apart.

A request's cache salt (vLLM's `cache_salt`) goes into the first block only, after the extra
key, as int32 -1 (never a token id, never a 4-byte length we would write) then the salt's
length and bytes. The salted first hash differs, so every later hash in the chain differs
too: requests share blocks only when their salts are equal (or both absent).

Images: a block that covers placeholder tokens of an image also takes, per such image, int32 -2
(another mark no token id takes), the image's offset in the prompt and its 32-byte hash. The
placeholder token ids are the same for every image; the hash tells them apart, so a block (and
through the chain every later block) is shared only by prompts with the same images there.
"""

from __future__ import annotations

import hashlib
from array import array

ROOT_HASH = hashlib.sha256(b"splitserve-prefix-cache-v1").digest()
_SALT_MARK = (0xFFFFFFFF).to_bytes(4, "little")
_IMAGE_MARK = (0xFFFFFFFE).to_bytes(4, "little")

MMSpan = tuple[int, int, bytes]
"""(offset, length, hash) of an image's placeholder tokens in the prompt."""


def hash_block(
    parent: bytes,
    token_ids: list[int],
    extra_key: bytes = b"",
    salt: bytes = b"",
    images: list[MMSpan] | tuple[MMSpan, ...] = (),
) -> bytes:
    h = hashlib.sha256(parent)
    if extra_key:
        h.update(len(extra_key).to_bytes(4, "little"))
        h.update(extra_key)
    if salt:
        h.update(_SALT_MARK)
        h.update(len(salt).to_bytes(4, "little"))
        h.update(salt)
    for offset, _, digest in images:
        h.update(_IMAGE_MARK)
        h.update(offset.to_bytes(4, "little"))
        h.update(digest)
    h.update(array("i", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes],
    token_ids: list[int],
    block_size: int,
    extra_key: bytes = b"",
    salt: bytes = b"",
    mm_spans: tuple[MMSpan, ...] = (),
) -> None:
    """Append the hashes of every full block of `token_ids` not hashed yet; `salt` enters the
    first block's hash only, an image's hash every block its placeholder span touches."""
    num_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), num_full):
        start, end = i * block_size, (i + 1) * block_size
        block = token_ids[start:end]
        images = [s for s in mm_spans if s[0] < end and s[0] + s[1] > start]
        parent = hash_block(parent, block, extra_key, salt if i == 0 else b"", images)
        hashes.append(parent)
