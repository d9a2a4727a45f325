"""Apply a packed grammar bitmask to logits in place (structured output).

The scheduler ships one int32 word per 32 tokens per row: bit j of word w allows token
32w + j. A program covers BLOCK_V tokens of one row, loads the words covering them and writes
-inf where the bit is clear. Token ids at or past 32 * W are left alone (as in xgrammar): the
mask says nothing about them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_int, check_same_device


@triton.jit
def _apply_token_bitmask_kernel(
    # pointers
    logits_ptr,
    bitmask_ptr,
    indices_ptr,
    # sizes
    num_tokens,
    # strides
    stride_logits,
    stride_bitmask,
    # meta
    HAS_INDICES: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    if HAS_INDICES:
        row = tl.load(indices_ptr + tl.program_id(0)).to(tl.int64)
    else:
        row = tl.program_id(0).to(tl.int64)
    tok = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_range = tok < num_tokens
    words = tl.load(bitmask_ptr + row * stride_bitmask + tok // 32, mask=in_range, other=-1)
    # Arithmetic shift of a negative word smears the sign bit, but `& 1` keeps only bit j.
    allowed = ((words >> (tok % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_logits + tok, float("-inf"), mask=in_range & ~allowed)


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: torch.Tensor | None = None
) -> None:
    """Set logits of disallowed tokens to -inf, in place (Triton).

    Args:
        logits: [B, V] float, last dim contiguous.
        bitmask: int32 [B, W] (usually W = ceil(V / 32)); bit j of word w allows token 32w + j.
        indices: optional int32/int64 [R] — only these rows (of logits and bitmask) are masked.
    """
    check_float("logits", logits, 2)
    check_int("bitmask", bitmask, 2, (torch.int32,))
    check_same_device(logits=logits, bitmask=bitmask, indices=indices)
    if bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask rows {bitmask.shape[0]} != logits rows {logits.shape[0]}")
    if bitmask.shape[1] > 1 and bitmask.stride(1) != 1:
        raise ValueError(f"bitmask must be row-contiguous, strides {bitmask.stride()}")
    if indices is not None:
        check_int("indices", indices, 1, (torch.int32, torch.int64))
    rows = logits.shape[0] if indices is None else indices.shape[0]
    num_tokens = min(logits.shape[1], bitmask.shape[1] * 32)
    if rows == 0 or num_tokens == 0:
        return
    block_v = 1024
    _apply_token_bitmask_kernel[(rows, triton.cdiv(num_tokens, block_v))](
        logits, bitmask, indices if indices is not None else bitmask,
        num_tokens, logits.stride(0), bitmask.stride(0),
        HAS_INDICES=indices is not None, BLOCK_V=block_v, num_warps=4,
    )  # fmt: skip
