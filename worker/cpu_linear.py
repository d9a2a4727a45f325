"""CPU float32 projections through oneDNN, without a second copy of any weight.

On CPU, `torch.nn.functional.linear` goes to a GEMM that, on the skinny shapes of decode steps
(a few to a few dozen rows against a large weight), reaches a fraction of what oneDNN's inner
product does (bench/RESULTS.md, "CPU decode"). Three modes, by `SPLITSERVE_CPU_ONEDNN_LINEAR`:

- `packed` (the default): the weight is replaced after loading by oneDNN's blocked layout
  (`pack`, an opaque `torch._mkldnn` tensor, laid out for `PACK_ROWS_HINT` rows) and every row
  count goes through oneDNN (fewer than `PACKED_MIN_ROWS` rows padded up to it); still one
  copy. Without the row hint this layout made one-row products ~5x slower than torch's GEMV;
  with it, in-process decode measured 1.1-1.8x `plain`'s tokens/s at batch 1 and 1.0-1.4x at
  batch 32 on the 2-core machine (noisy; bench/RESULTS.md, 2026-12-06 17:00-18:00).
- `plain`: the weight stays as loaded; two or more rows go through oneDNN, which reads the
  plain [out, in] weight, one row stays on torch's linear (a matrix-vector product).
- `0`: torch's linear always (A/B benchmarks).

`unpack` gives a plain weight back (a temporary) where one is needed.
NOTE: packing happens after loading; nothing writes a weight later. A layer whose plain weight
is needed while serving (tied to the embedding) is not packed.
"""

from __future__ import annotations

import os

import torch

ONEDNN_LINEAR_ENV = "SPLITSERVE_CPU_ONEDNN_LINEAR"
"""packed (default), plain, or 0 (see the module docstring)."""
MODES = ("plain", "packed", "0")

MAX_ROWS = 2048
"""Rows per oneDNN call; longer inputs go in chunks of this many."""


def onednn_linear_available() -> bool:
    """True when this torch build has oneDNN and the packed-linear ops."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


def mode() -> str:
    """The configured mode; "0" as well when this torch build lacks the oneDNN ops."""
    value = os.environ.get(ONEDNN_LINEAR_ENV, "packed")
    if value == "1":
        value = "packed"
    if value not in MODES:
        raise ValueError(f"{ONEDNN_LINEAR_ENV}={value!r}; expected one of {', '.join(MODES)}")
    return value if onednn_linear_available() else "0"


def supports(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A plain float32 CPU weight (and bias) that oneDNN can take."""
    return (
        weight.device.type == "cpu"
        and weight.layout == torch.strided
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and (bias is None or bias.dtype == torch.float32)
    )


PACK_ROWS_HINT = 32
"""The row count oneDNN picks the packed layout for (`pack`). NOTE: without a hint the layout
made one- to eight-row products several times slower than torch's GEMV on the 2-core AMD
machine; with 32 they ran about as fast as the plain-weight oneDNN path at 32 rows or faster
(bench/RESULTS.md, 2026-12-06 17:00-18:00)."""

PACKED_MIN_ROWS = 4
"""Packed products of fewer rows are padded to this many: oneDNN's one-row path over a
packed weight was slower than its four-row one on the machine measured."""


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] in oneDNN's blocked layout (same logical shape and values)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def is_packed(weight: torch.Tensor) -> bool:
    return weight.layout == torch._mkldnn


def unpack(weight: torch.Tensor) -> torch.Tensor:
    """A plain copy of a packed weight (or the weight itself when it is plain)."""
    return weight.to_dense() if is_packed(weight) else weight


def row_bucket(rows: int) -> int:
    """The row count a oneDNN call is padded to: the smallest power of two, or 3/4 of one,
    at or above `rows` (so at most a third of the rows are padding).

    NOTE: oneDNN caches one primitive per input shape, about half a MiB each for these
    weights; padding to a few row counts keeps that cache, and the worker's memory, bounded
    however the step sizes vary (tests/e2e/test_overload bounds the worker's RSS).
    """
    power = 1 << (rows - 1).bit_length()
    three_quarters = power * 3 // 4
    return three_quarters if power >= 4 and three_quarters >= rows else power


def _onednn(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n = rows.shape[0]
    padded = row_bucket(max(n, PACKED_MIN_ROWS) if is_packed(weight) else n)
    if padded != n:
        rows = torch.cat([rows, rows.new_zeros(padded - n, rows.shape[1])])
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return y[:n] if padded != n else y


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight.T + bias through oneDNN: [..., out]; `weight` plain or packed."""
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    n = rows.shape[0]
    if n == 0:
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    if n <= MAX_ROWS:
        y = _onednn(rows, weight, bias)
    else:
        y = torch.cat(
            [_onednn(rows[i : i + MAX_ROWS], weight, bias) for i in range(0, n, MAX_ROWS)]
        )
    return y.reshape(*x.shape[:-1], y.shape[-1])
