"""Token bitmask kernel vs reference, and the reference's bit order vs a per-bit loop."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels.reference import apply_token_bitmask_ref
from splitserve.kernels.token_bitmask import apply_token_bitmask

from .kernel_test_utils import DEVICE, DTYPES


def _random_bitmask(rows: int, words: int) -> torch.Tensor:
    # Full int32 range, so sign bits (token 32w + 31) are exercised.
    return (
        torch.randint(-(2**31), 2**31, (rows, words), dtype=torch.int64).to(torch.int32).to(DEVICE)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "rows,vocab,words",
    [(1, 1, 1), (3, 31, 1), (2, 33, 2), (4, 1000, 32), (2, 2100, 66), (2, 100, 3)],
)
@pytest.mark.parametrize("with_indices", [False, True])
def test_bitmask_kernel(rows, vocab, words, dtype, with_indices):
    logits = torch.randn(rows, vocab, device=DEVICE).to(dtype)
    bitmask = _random_bitmask(rows, words)
    indices = None
    if with_indices:
        indices = torch.randperm(rows)[: max(1, rows // 2)].to(DEVICE)
    expected = logits.clone()
    apply_token_bitmask_ref(expected, bitmask, indices)
    apply_token_bitmask(logits, bitmask, indices)
    assert torch.equal(logits, expected)


def test_reference_bit_order():
    """Bit j of word w governs token 32w + j; rows outside indices untouched; tokens the mask
    does not cover (>= 32W) untouched."""
    vocab, words = 70, 2
    bitmask = _random_bitmask(3, words).cpu()
    logits = torch.zeros(3, vocab)
    indices = torch.tensor([2, 0])
    apply_token_bitmask_ref(logits, bitmask, indices)
    for row in range(3):
        for tok in range(vocab):
            if row == 1 or tok >= 32 * words:
                expected = 0.0
            else:
                bit = (int(bitmask[row, tok // 32]) >> (tok % 32)) & 1
                expected = 0.0 if bit else float("-inf")
            assert logits[row, tok].item() == expected, (row, tok)


def test_bitmask_rejects_bad_dtype():
    with pytest.raises(ValueError, match="bitmask"):
        apply_token_bitmask(
            torch.zeros(1, 32, device=DEVICE), torch.zeros(1, 1, dtype=torch.int64, device=DEVICE)
        )


@pytest.mark.parametrize(
    "rows,vocab,words",
    [(1, 1, 1), (3, 31, 1), (2, 33, 2), (4, 1000, 32), (2, 2100, 66), (2, 100, 3)],
)
@pytest.mark.parametrize("with_indices", [False, True])
def test_cpu_fast_path_matches_reference(rows, vocab, words, with_indices):
    from splitserve.kernels import torch_ops

    logits = torch.randn(rows, vocab)
    bitmask = _random_bitmask(rows, words).cpu()
    indices = torch.randperm(rows)[: max(1, rows // 2)] if with_indices else None
    expected = logits.clone()
    apply_token_bitmask_ref(expected, bitmask, indices)
    torch_ops.apply_token_bitmask(logits, bitmask, indices)
    assert torch.equal(logits, expected)
