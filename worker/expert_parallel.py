"""Expert parallelism: an MoE layer whose experts are partitioned over the stage's ranks.

Each rank of the stage holds E / T experts whole (`MoEExperts.first_expert` on). The layer's
input is the same on every rank (attention is tensor-parallel and ends in an all-reduce), so
each rank takes an equal share of the tokens and:

1. dispatch: sorts its (token, expert) pairs by the rank holding the expert, swaps the counts
   with every rank, then the hidden rows and the expert ids (`all_to_all_single`);
2. runs the rows it received through its own experts (one expert per row, weight 1);
3. combine: sends each result back the way its row came (`all_to_all_single`), weights the
   rows by their router weights and adds them into its tokens;
4. all-gathers the shares, so every rank again holds the whole layer output.

The routing is exact: every expert sees the tokens the router sent it, and the output equals
the single-rank layer up to the order of the floating-point sums.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from splitserve.worker import parallel_state


def ep_moe(
    experts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """x [N, H] (the same on every rank), router weights [N, K] fp32, expert ids [N, K] ->
    [N, H] on every rank."""
    group = parallel_state.tp_group()
    size, rank = experts.ep_size, experts.first_expert // experts.num_local_experts
    n, k = topk_ids.shape
    share = -(-n // size)
    start, stop = min(rank * share, n), min((rank + 1) * share, n)
    ids = topk_ids[start:stop].reshape(-1)
    weights = topk_weights[start:stop].reshape(-1)
    tokens = torch.arange(start, stop, device=x.device).repeat_interleave(k)
    # 1. dispatch: pairs sorted by destination rank.
    dest = torch.div(ids, experts.num_local_experts, rounding_mode="floor")
    order = torch.argsort(dest, stable=True)
    ids, weights, tokens, dest = ids[order], weights[order], tokens[order], dest[order]
    send_counts = torch.bincount(dest, minlength=size)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    received = x.new_empty(sum(recv_splits), x.shape[1])
    dist.all_to_all_single(received, x[tokens].contiguous(), recv_splits, send_splits, group=group)
    received_ids = ids.new_empty(sum(recv_splits))
    dist.all_to_all_single(received_ids, ids.contiguous(), recv_splits, send_splits, group=group)
    # 2. this rank's experts over the rows it received.
    local_ids = (received_ids - experts.first_expert).unsqueeze(1)
    ones = torch.ones(local_ids.shape, dtype=torch.float32, device=x.device)
    # NOTE: through the experts' forward, so a quant method that keeps its own form (FP8 on
    # the GPU's grouped GEMM) runs its stacks of this rank's slots.
    computed = experts(received, ones, local_ids)
    # 3. combine: results back to the ranks the rows came from, weighted into their tokens.
    returned = x.new_empty(len(tokens), x.shape[1])
    dist.all_to_all_single(returned, computed.contiguous(), send_splits, recv_splits, group=group)
    out = torch.zeros(share, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens - start, returned.float() * weights.unsqueeze(1))
    # 4. every rank gets every share.
    shares = [torch.empty_like(out) for _ in range(size)]
    dist.all_gather(shares, out, group=group)
    return torch.cat(shares)[:n].to(x.dtype)
