"""KV-cache write kernel vs reference: exact copies, skipped slots, strided views."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.kv_cache import write_kv_cache
from splitserve.kernels.reference import write_kv_cache_ref

from .kernel_test_utils import DEVICE, DTYPES


def _slots(num_tokens: int, num_blocks: int, block_size: int) -> torch.Tensor:
    """Distinct random slots, every third token skipped (-1) like graph padding."""
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].long()
    slots[::3] = -1
    return slots.to(DEVICE)


@pytest.mark.parametrize("cache_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("src_dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_tokens,num_kv_heads,head_dim,block_size", [(1, 1, 64, 16), (13, 3, 80, 4), (7, 8, 96, 8)]
)
def test_write_matches_reference(
    num_tokens, num_kv_heads, head_dim, block_size, src_dtype, cache_dtype
):
    num_blocks = 5
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(src_dtype)
    value = torch.randn_like(key)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, device=DEVICE).to(cache_dtype)
    value_cache = torch.randn(shape, device=DEVICE).to(cache_dtype)
    slots = _slots(num_tokens, num_blocks, block_size)
    k_ref, v_ref = key_cache.clone(), value_cache.clone()
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, k_ref)
    assert torch.equal(value_cache, v_ref)
    # The reference itself: a written slot holds the token, skipped tokens land nowhere.
    bs = block_size
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(k_ref[s // bs, s % bs], key[t].to(cache_dtype))


def test_write_strided_views():
    """key/value as column slices of a fused qkv output, caches as halves of one kv tensor."""
    num_tokens, hq, hk, d, nb, bs = 9, 4, 2, 64, 6, 4
    qkv = torch.randn(num_tokens, (hq + 2 * hk) * d, device=DEVICE)
    key = qkv[:, hq * d : (hq + hk) * d].view(num_tokens, hk, d)
    value = qkv[:, (hq + hk) * d :].view(num_tokens, hk, d)
    kv = torch.zeros(nb, 2, bs, hk, d, device=DEVICE)  # [NB, 2, BS, Hk, D]: strided halves
    kv_ref = kv.clone()
    slots = _slots(num_tokens, nb, bs).int()  # int32 slots are accepted too
    write_kv_cache(key, value, kv[:, 0], kv[:, 1], slots)
    write_kv_cache_ref(key, value, kv_ref[:, 0], kv_ref[:, 1], slots)
    assert torch.equal(kv, kv_ref)
    assert kv.abs().sum() > 0


def test_write_rejects_mismatched_shapes():
    key = torch.randn(3, 2, 64, device=DEVICE)
    cache = torch.zeros(2, 4, 2, 64, device=DEVICE)
    with pytest.raises(ValueError):
        write_kv_cache(key, key, cache, cache, torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError):
        write_kv_cache(key, key, cache[..., :32], cache[..., :32], torch.zeros(3, dtype=torch.long))
