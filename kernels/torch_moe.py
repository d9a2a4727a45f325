"""CPU (torch) path of the fused MoE op: each expert runs only on the tokens routed to it.

Token-expert pairs are sorted by expert once, so each expert's tokens are one contiguous run of
the sorted order; one pair of matmuls per expert that received tokens, none for the others.
The per-expert outputs, scaled by their routing weights, are added into the output rows in
ascending expert order (what transformers' experts loop does), in the activation dtype.

NOTE: the run lengths are read on the host (one sync per layer) and shapes follow the routing,
so this path cannot be captured in a CUDA graph; on CUDA, `dispatch.fused_moe` runs the
Triton kernel (`fused_moe.py`) instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .torch_ops import moe_activation


def fused_moe_torch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
) -> torch.Tensor:
    """SwiGLU experts over their routed tokens, weighted and summed per token.

    Args:
        x: [T, H]; w13: [E, 2I, H] (each expert's gate rows, then its up rows);
        w2: [E, H, I]; topk_weights: [T, K] (any float dtype); topk_ids: int [T, K] in [0, E).
        b13: [E, 2I], b2: [E, H] or None: per-expert biases of the two projections (the
            down bias is added before the routing weight scales the output, as gpt-oss does).
        swiglu_limit, swiglu_alpha: a limit selects gpt-oss's clamped SwiGLU
            (`torch_ops.clamped_swiglu`); None is SiLU-and-mul.

    Returns:
        [T, H] in x.dtype: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    out = torch.zeros_like(x)
    if num_tokens == 0:
        return out
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // top_k  # the token of each sorted (token, slot) pair
    weights = topk_weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        bias13 = b13[expert] if b13 is not None else None
        bias2 = b2[expert] if b2 is not None else None
        hidden = F.linear(x.index_select(0, rows), w13[expert], bias13)
        hidden = moe_activation(hidden, swiglu_limit, swiglu_alpha)
        hidden = F.linear(hidden, w2[expert], bias2).mul_(weights[start : start + count])
        out.index_add_(0, rows, hidden)
        start += count
    return out
