"""Grouped GEMM for MoE experts: out[rows of group g] = a[rows] @ b[g].T, M varying per group.

Two layouts of the rows, in the manner of DeepGEMM's m-grouped GEMMs:
- contiguous (prefill): a [M, K] holds the groups' rows one after another, each group's run
  starting at a multiple of BLOCK_M (padded); `m_indices` int32 [M] names each row's group, -1
  for padding rows. A BLOCK_M tile of rows therefore belongs to one group, which it reads from
  its first row; tiles of padding do nothing. M is sized for the worst case by the caller, so
  the grid never depends on the routing.
- masked (decode): a [G, max_m, K] holds up to max_m rows per group and `masked_m` int32 [G]
  how many of them are real. Every shape is fixed by (G, max_m), so a decode step that uses it
  can be captured in a CUDA graph; tiles past a group's count return at once.

b is [G, N, K] (each group's weight as a linear layer holds it). Two precisions:
- fp16 / bf16 / fp32 operands, fp32 accumulation;
- block-scaled FP8 (DeepSeek-V3 layout): a float8_e4m3fn with float32 scales per row and per
  group of bk features, a_scale [rows, ceil(K / bk)]; b float8_e4m3fn with scales per
  [bn, bk] block, b_scale [G, ceil(N / bn), ceil(K / bk)]. Each K tile (BLOCK_K divides bk)
  multiplies its FP8 partial product by its rows' and its columns' scales.

Output rows that are padding (contiguous) or past a group's count (masked) are not written.
Plain-torch references: `torch_grouped_gemm.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, cdiv, check_int, check_same_device, dot_precision

BLOCK_N = 64
FP8_DTYPE = torch.float8_e4m3fn


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    out_ptr,
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    group_ptr,
    # sizes
    M,
    N,
    K,
    max_m,
    scale_bn,
    scale_bk,
    # strides (the K axis of a and b, the N axis of out and of a_scale rows are contiguous)
    stride_am,
    stride_bg,
    stride_bn,
    stride_om,
    stride_asm,
    stride_bsg,
    stride_bsn,
    # meta
    MASKED: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs = tl.arange(0, BLOCK_M)
    if MASKED:
        blocks_per_group = tl.cdiv(max_m, BLOCK_M)
        group = pid_m // blocks_per_group
        local = (pid_m % blocks_per_group) * BLOCK_M + offs
        count = tl.load(group_ptr + group)
        row_mask = local < count
        rows = group * max_m + local
        active = (pid_m % blocks_per_group) * BLOCK_M < count
    else:
        rows = pid_m * BLOCK_M + offs
        group = tl.load(group_ptr + pid_m * BLOCK_M)
        row_group = tl.load(group_ptr + rows, mask=rows < M, other=-1)
        row_mask = row_group == group
        active = group >= 0
    if active:
        row_offs = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        b_base = b_ptr + group.to(tl.int64) * stride_bg + offs_n.to(tl.int64)[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            a = tl.load(
                a_ptr + row_offs[:, None] * stride_am + (k0 + offs_k)[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            # [BLOCK_K, BLOCK_N] view of b[group].T
            b = tl.load(
                b_base + (k0 + offs_k)[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            if FP8:
                part = tl.dot(a, b, out_dtype=tl.float32)
                sa = tl.load(
                    a_scale_ptr + row_offs * stride_asm + k0 // scale_bk, mask=row_mask, other=0.0
                )
                sb = tl.load(
                    b_scale_ptr
                    + group.to(tl.int64) * stride_bsg
                    + (offs_n // scale_bn) * stride_bsn
                    + k0 // scale_bk,
                    mask=n_mask,
                    other=0.0,
                )
                acc += part * sa[:, None] * sb[None, :]
            else:
                acc += tl.dot(a, b, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        tl.store(
            out_ptr + row_offs[:, None] * stride_om + offs_n[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & n_mask[None, :],
        )


def _check_operands(a: torch.Tensor, b: torch.Tensor, fp8: bool) -> tuple[int, int, int]:
    """(G, N, K) of b after checking a [..., K] against it."""
    if b.dim() != 3:
        raise ValueError(f"b must be [G, N, K], got shape {tuple(b.shape)}")
    for name, t in (("a", a), ("b", b)):
        if fp8 and t.dtype != FP8_DTYPE:
            raise ValueError(f"{name} must be float8_e4m3fn for the FP8 GEMM, got {t.dtype}")
        if not fp8 and t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be one of {FLOAT_DTYPES}, got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got {t.stride()}")
    if not fp8 and a.dtype != b.dtype:
        raise ValueError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    groups, n, k = b.shape
    if a.shape[-1] != k:
        raise ValueError(f"a has {a.shape[-1]} features, b {k}: a [..., K] against b [G, N, K]")
    return groups, n, k


def _check_scales(
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    rows: int,
    b_shape: tuple[int, int, int],
    block: tuple[int, int],
) -> int:
    """The K tile for the FP8 GEMM after checking the scales' shapes against the block."""
    groups, n, k = b_shape
    bn, bk = block
    want_a, want_b = (rows, cdiv(k, bk)), (groups, cdiv(n, bn), cdiv(k, bk))
    if tuple(a_scale.shape) != want_a or tuple(b_scale.shape) != want_b:
        raise ValueError(
            f"scales for block {tuple(block)} must be a_scale {list(want_a)} and b_scale "
            f"{list(want_b)}, got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}"
        )
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ValueError(f"scales must be float32, got {a_scale.dtype} and {b_scale.dtype}")
    tile = fp8_block_k(bk)
    if tile is None:
        raise ValueError(f"the FP8 grouped GEMM needs bk a multiple of 32, got block {block}")
    return tile


def fp8_block_k(bk: int) -> int | None:
    """The K tile of the FP8 GEMM for scale groups of bk features (a tile never straddles two
    groups), or None when bk is not a multiple of 32 (the FP8 dot's smallest K)."""
    for tile in (128, 64, 32):
        if bk % tile == 0:
            return tile
    return None


def _launch(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    group_index: torch.Tensor,
    *,
    masked: bool,
    max_m: int,
    num_row_blocks: int,
    block_m: int,
    block_k: int,
    scales: tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None = None,
) -> None:
    n, k = b.shape[1], b.shape[2]
    if num_row_blocks == 0 or n == 0:
        return
    if scales is None:
        a_scale = b_scale = b
        bn, bk, stride_asm, stride_bsg, stride_bsn = 1, 1, 0, 0, 0
    else:
        a_scale, b_scale, (bn, bk) = scales
        a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
        stride_asm, stride_bsg, stride_bsn = a_scale.stride(0), b_scale.stride(0), b_scale.stride(1)
    grid = (num_row_blocks, cdiv(n, BLOCK_N))
    _grouped_gemm_kernel[grid](
        out, a, b, a_scale, b_scale, group_index,
        a.shape[0], n, k, max_m, bn, bk,
        a.stride(0), b.stride(0), b.stride(1), out.stride(0), stride_asm, stride_bsg, stride_bsn,
        MASKED=masked, FP8=scales is not None,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(a.dtype),
    )  # fmt: skip


def _check_block_m(block_m: int) -> None:
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16 (tl.dot), got {block_m}")


def _masked_block_m(max_m: int) -> int:
    return 16 if max_m <= 16 else 32 if max_m <= 32 else 64


def grouped_gemm_contiguous(
    a: torch.Tensor,
    b: torch.Tensor,
    m_indices: torch.Tensor,
    *,
    block_m: int = 64,
    out_dtype: torch.dtype | None = None,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Contiguous layout: out[r] = a[r] @ b[m_indices[r]].T for every row with a group.

    Args:
        a: [M, K]; the rows of each group start at a multiple of `block_m` (the layout's
            alignment) and are contiguous; padding rows carry m_indices -1.
        b: [G, N, K]. m_indices: int32 [M], in [0, G) or -1.
        block_m: the rows' alignment; the kernel's row tile (a power of two >= 16).
        out_dtype: the output dtype (default a.dtype; required for FP8).
        a_scale, b_scale, block: FP8 only: a and b float8_e4m3fn, a_scale float32
            [M, ceil(K / bk)], b_scale float32 [G, ceil(N / bn), ceil(K / bk)], block (bn, bk)
            with bk a multiple of 32.

    Returns:
        [M, N] in out_dtype; padding rows are not written (their values are undefined).
    """
    fp8 = block is not None
    _, n, k = _check_operands(a, b, fp8)
    check_int("m_indices", m_indices, 1, (torch.int32,))
    check_same_device(a=a, b=b, m_indices=m_indices, a_scale=a_scale, b_scale=b_scale)
    _check_block_m(block_m)
    if a.dim() != 2 or m_indices.shape[0] != a.shape[0]:
        raise ValueError(
            f"a must be [M, K] and m_indices [M], got {tuple(a.shape)}, {tuple(m_indices.shape)}"
        )
    scales, block_k = None, 64
    if fp8:
        if out_dtype is None:
            raise ValueError("out_dtype is required for the FP8 grouped GEMM")
        block_k = _check_scales(a_scale, b_scale, a.shape[0], tuple(b.shape), block)
        scales = (a_scale, b_scale, block)
    out = torch.empty(a.shape[0], n, dtype=out_dtype or a.dtype, device=a.device)
    _launch(
        out, a, b.contiguous(), m_indices.contiguous(), masked=False, max_m=0,
        num_row_blocks=cdiv(a.shape[0], block_m), block_m=block_m, block_k=block_k, scales=scales,
    )  # fmt: skip
    return out


def grouped_gemm_masked(
    a: torch.Tensor,
    b: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Masked layout: out[g, i] = a[g, i] @ b[g].T for i < masked_m[g].

    Args:
        a: [G, max_m, K]; b: [G, N, K]; masked_m: int32 [G], each in [0, max_m] (read on the
            device only: no host sync, static shapes).
        out_dtype, a_scale, b_scale, block: as `grouped_gemm_contiguous`, with a_scale
            [G, max_m, ceil(K / bk)].

    Returns:
        [G, max_m, N] in out_dtype; rows past a group's count are not written.
    """
    fp8 = block is not None
    groups, n, k = _check_operands(a, b, fp8)
    check_int("masked_m", masked_m, 1, (torch.int32,))
    check_same_device(a=a, b=b, masked_m=masked_m, a_scale=a_scale, b_scale=b_scale)
    if a.dim() != 3 or a.shape[0] != groups or masked_m.shape[0] != groups:
        raise ValueError(
            f"a must be [{groups}, max_m, {k}] and masked_m [{groups}], got {tuple(a.shape)} "
            f"and {tuple(masked_m.shape)}"
        )
    max_m = a.shape[1]
    a2 = a.contiguous().view(groups * max_m, k)
    scales, block_k = None, 64
    if fp8:
        if out_dtype is None:
            raise ValueError("out_dtype is required for the FP8 grouped GEMM")
        if a_scale is None or a_scale.dim() != 3:
            raise ValueError("a_scale must be [G, max_m, ceil(K / bk)] in the masked layout")
        a_scale = a_scale.reshape(groups * max_m, -1)
        block_k = _check_scales(a_scale, b_scale, groups * max_m, tuple(b.shape), block)
        scales = (a_scale, b_scale, block)
    out = torch.empty(groups, max_m, n, dtype=out_dtype or a.dtype, device=a.device)
    block_m = _masked_block_m(max_m)
    _launch(
        out.view(groups * max_m, n), a2, b.contiguous(), masked_m.contiguous(), masked=True,
        max_m=max_m, num_row_blocks=groups * cdiv(max_m, block_m), block_m=block_m,
        block_k=block_k, scales=scales,
    )  # fmt: skip
    return out
