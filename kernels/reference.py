"""Plain-torch references for every kernel in `splitserve.kernels`.

These are the oracles of the kernel tests: written for clarity, computed in fp32 and cast back
to the input dtype at the same points the kernels (and Hugging Face models) do. They are also
vectorised enough to serve as the CPU path for the elementwise ops (see `dispatch.py`).

Shapes use: T tokens, S sequences, Hq query heads, Hk KV heads, D head dim, NB cache blocks,
BS block size, MB max blocks per sequence, V vocab, I intermediate size, E experts, K experts
per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "apply_rotary_ref",
    "apply_token_bitmask_ref",
    "fused_add_rms_norm_ref",
    "fp8_quantize_tokens_ref",
    "fp8_w8a8_linear_ref",
    "fused_moe_ref",
    "gelu_and_mul_ref",
    "paged_attention_ref",
    "rms_norm_ref",
    "int4_pack_k",
    "int4_unpack_k",
    "silu_and_mul_ref",
    "soft_cap_logits",
    "w4a16_dequantize_ref",
    "w4a16_linear_ref",
    "write_kv_cache_ref",
]


# --------------------------------------------------------------------------- attention


def soft_cap_logits(logits: torch.Tensor, soft_cap: float | None) -> torch.Tensor:
    """Gemma-2 style logit capping: soft_cap * tanh(logits / soft_cap); identity when None."""
    if soft_cap is None or soft_cap <= 0:
        return logits
    return soft_cap * torch.tanh(logits / soft_cap)


def gather_sequence_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one sequence's keys/values out of the paged cache.

    Args:
        key_cache, value_cache: [NB, BS, Hk, D].
        block_table: int [MB] — only the first ceil(seq_len / BS) entries are read, so padding
            entries may hold anything (0, -1, stale ids).
        seq_len: tokens of this sequence in the cache.

    Returns:
        (k, v), each [seq_len, Hk, D].
    """
    block_size = key_cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    k = key_cache[blocks].reshape(-1, *key_cache.shape[2:])[:seq_len]
    v = value_cache[blocks].reshape(-1, *value_cache.shape[2:])[:seq_len]
    return k, v


def attention_mask(
    query_positions: torch.Tensor, key_len: int, sliding_window: int | None
) -> torch.Tensor:
    """Boolean [Q, K] mask: key j is visible to a query at position p iff p - window < j <= p."""
    j = torch.arange(key_len, device=query_positions.device)
    p = query_positions[:, None]
    mask = j[None, :] <= p
    if sliding_window is not None:
        mask &= j[None, :] > p - sliding_window
    return mask


def kv_quantize_ref(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Keys or values as an FP8 KV cache stores them: x / scale, saturated at the format's
    largest finite value, rounded to `dtype` (float8_e4m3fn or float8_e5m2)."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(dtype)


def kv_dequantize_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """What attention reads from an FP8 KV cache: x * scale in `dtype`."""
    return (x.float() * scale).to(dtype)


def paged_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention over a block-table KV cache, one sequence at a time, in fp32.

    Args:
        q: [T, Hq, D] — queries of all sequences, flattened; sequence i owns rows
            cu_seqlens_q[i]:cu_seqlens_q[i+1] and those are its LAST query_len positions.
        key_cache, value_cache: [NB, BS, Hk, D]; Hq % Hk == 0 (GQA/MQA).
        block_tables: int32 [S, MB].
        seq_lens: int32 [S] — tokens in the cache per sequence, new ones included.
        cu_seqlens_q: int32 [S + 1].
        scale: multiplies q·k before capping and softmax.
        sliding_window: a query at position p sees keys in (p - window, p].
        soft_cap: logits -> soft_cap * tanh(logits / soft_cap).
        sinks: fp32 [Hq] — one extra logit per head in the softmax denominator, with no value.

    Returns:
        [T, Hq, D] in q.dtype; rows not covered by cu_seqlens_q are zero.
    """
    num_heads = q.shape[1]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = cu[i], cu[i + 1]
        query_len = q_end - q_start
        if query_len == 0:
            continue
        k, v = gather_sequence_kv(key_cache, value_cache, block_tables[i], seq_len)
        # GQA: query head h reads KV head h // group.
        k = k.float().repeat_interleave(group, dim=1)  # [K, Hq, D]
        v = v.float().repeat_interleave(group, dim=1)
        qi = q[q_start:q_end].float()  # [Q, Hq, D]
        logits = torch.einsum("qhd,khd->hqk", qi, k) * scale
        logits = soft_cap_logits(logits, soft_cap)
        positions = torch.arange(seq_len - query_len, seq_len, device=q.device)
        mask = attention_mask(positions, seq_len, sliding_window)
        logits = logits.masked_fill(~mask[None], float("-inf"))
        if sinks is not None:
            sink_col = sinks.float()[:, None, None].expand(-1, query_len, 1)
            probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(logits, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def write_kv_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new keys/values into the paged cache, in place.

    Args:
        key, value: [T, Hk, D].
        key_cache, value_cache: [NB, BS, Hk, D] (any strides).
        slot_mapping: int64 [T]; slot = block_id * BS + offset, slot < 0 skips the token
            (padding tokens of a CUDA-graph batch).
    """
    block_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    # Two-index advanced assignment works for any cache strides (no .view() needed).
    key_cache[blocks, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(value_cache.dtype)


# --------------------------------------------------------------------------- norms


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as in HF Llama: normalise in fp32, cast to x.dtype, then multiply by weight.

    Args:
        x: [..., N]; weight: [N].

    Returns:
        [..., N] in x.dtype.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * normed.to(x.dtype).float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x.dtype as a model would.

    Args:
        x, residual: [..., N] same dtype; weight: [N].
    """
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual


# --------------------------------------------------------------------------- rotary


def apply_rotary_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, out of place.

    Args:
        positions: int64 [T].
        q: [T, Hq, D]; k: [T, Hk, D].
        cos_sin_cache: [max_pos, R] — cos in [:, :R/2], sin in [:, R/2:]; R <= D, and only the
            first R dims of each head rotate (partial rotary).
        is_neox: rotate halves (x[:R/2], x[R/2:R]); False rotates interleaved pairs (gpt-j).

    Returns:
        (q_out, k_out) with the input shapes and dtypes.
    """
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, R/2]
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xr, xp = xf[..., :rot], xf[..., rot:]
        if is_neox:
            x1, x2 = xr.chunk(2, dim=-1)
            y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            y = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        return torch.cat([y, xp], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


# --------------------------------------------------------------------------- activations


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] computed in fp32 (fp64 for fp64 x). [..., 2I] -> [..., I]."""
    gate, up = _at_least_fp32(x).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def gelu_and_mul_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(x[..., :I]) * x[..., I:] in fp32 (fp64 for fp64 x); approximate "none" (erf) or
    "tanh"."""
    gate, up = _at_least_fp32(x).chunk(2, dim=-1)
    return (F.gelu(gate, approximate=approximate) * up).to(x.dtype)


# --------------------------------------------------------------------------- grammar bitmask


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 [B, W] -> bool [B, min(vocab_size, 32W)]; bit j of word w is token 32w + j."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)
    return allowed[:, :vocab_size]


def apply_token_bitmask_ref(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: torch.Tensor | None = None
) -> None:
    """Set disallowed logits to -inf, in place.

    Args:
        logits: [B, V] float.
        bitmask: int32 [B, W], usually W = ceil(V / 32); a token id >= 32W is left untouched
            (as in xgrammar) because the mask says nothing about it.
        indices: optional int [R] — only these rows (of logits and bitmask alike) are masked.
    """
    vocab = logits.shape[1]
    n = min(vocab, bitmask.shape[1] * 32)
    if indices is None:
        allowed = unpack_bitmask(bitmask, n)
        logits[:, :n].masked_fill_(~allowed, float("-inf"))
        return
    rows = indices.long()
    allowed = unpack_bitmask(bitmask[rows], n)
    sub = logits[rows, :n].masked_fill(~allowed, float("-inf"))
    logits[rows, :n] = sub


# --------------------------------------------------------------------------- mixture of experts


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
) -> torch.Tensor:
    """Token by token, slot by slot: sum_j w[t, j] * down(silu(gate(x[t])) * up(x[t])) of
    expert topk_ids[t, j], in fp32 with the projections' outputs rounded to x.dtype, where a
    model (and the kernels) store them.

    Args:
        x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I];
        topk_weights: [T, K]; topk_ids: int [T, K]; b13 [E, 2I], b2 [E, H]: optional biases;
        swiglu_limit: gpt-oss's clamped SwiGLU (gate <= limit, |up| <= limit) when set.

    Returns:
        [T, H] in x.dtype.
    """

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(x.dtype).float()

    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        xt = x[t].float().cpu()
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_up = w13[e].float().cpu() @ xt
            if b13 is not None:
                gate_up = gate_up + b13[e].float().cpu()
            gate, up = rounded(gate_up).chunk(2)
            if swiglu_limit is None:
                hidden = rounded(F.silu(gate) * up)
            else:  # gpt-oss: clamped gate and up, sigmoid gain alpha, up shifted by one
                gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
                hidden = rounded((up + 1) * gate * torch.sigmoid(swiglu_alpha * gate))
            down = w2[e].float().cpu() @ hidden
            if b2 is not None:
                down = down + b2[e].float().cpu()
            out[t] += float(topk_weights[t, j]) * rounded(down)
    return out.to(device=x.device, dtype=x.dtype)


def fp8_dequantize_ref(
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The real weight of an FP8 one: weight[n, k] * scale[n // bn, k // bk], in `dtype`.

    Args:
        weight: float8_e4m3fn [N, K]; scale: [ceil(N / bn), ceil(K / bk)]; block: (bn, bk).
    """
    n, k = weight.shape
    bn, bk = block
    full = scale.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return (weight.float() * full).to(dtype)


def fp8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequant(weight).T + bias in x.dtype (weight-only: x is not quantized)."""
    return F.linear(x, fp8_dequantize_ref(weight, scale, block, x.dtype), bias)


def fp8_quantize_tokens_ref(
    x: torch.Tensor, group: int, scale_ub: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 (e4m3) quantization of activations per token and per group of `group`
    features: (x_q float8_e4m3fn [M, K], scale float32 [M, ceil(K / group)]) with each group's
    absmax (capped at `scale_ub` when given, as fbgemm's activation_scale_ub does) mapped to
    448; x[m, k] ~ x_q[m, k] * scale[m, k // group].
    """
    m, k = x.shape
    groups = -(-k // group)
    padded = x.float()
    if groups * group != k:
        padded = F.pad(padded, (0, groups * group - k))
    padded = padded.view(m, groups, group)
    amax = padded.abs().amax(dim=-1)
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    scale = amax.clamp(min=1e-12) / 448.0
    q = (padded / scale[..., None]).clamp(-448.0, 448.0).view(m, -1)[:, :k]
    return q.to(torch.float8_e4m3fn), scale


def fp8_quantize_static_ref(
    x: torch.Tensor, input_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static FP8 (e4m3) quantization of activations x [M, K] with the checkpoint's one
    per-tensor `input_scale` (a calibrated absmax / 448): (x_q float8_e4m3fn [M, K], scale
    float32 [M, 1], every row the same value); values past the calibrated range saturate."""
    scale = input_scale.reshape(()).float()
    q = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale.expand(x.shape[0], 1).contiguous()


def fp8_w8a8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    scale_ub: float | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequant(weight).T + bias with x quantized to FP8 first (W8A8): with the static
    per-tensor `input_scale` when given, else dynamically per token over the whole K when the
    weight's scale block spans K (per-tensor, per-channel), or per token and per group of the
    weight block's bk (block-scaled, the DeepSeek-V3 recipe). In x.dtype."""
    k = x.shape[-1]
    group = block[1] if block[1] < k else k
    if input_scale is not None:
        group = k
        x_q, x_scale = fp8_quantize_static_ref(x.reshape(-1, k), input_scale)
    else:
        x_q, x_scale = fp8_quantize_tokens_ref(x.reshape(-1, k), group, scale_ub)
    x_deq = x_q.float() * x_scale.repeat_interleave(group, dim=1)[:, :k]
    w_deq = fp8_dequantize_ref(weight, scale, block, torch.float32)
    out = F.linear(x_deq, w_deq, None if bias is None else bias.float())
    return out.to(x.dtype).view(*x.shape[:-1], -1)


def int4_pack_k(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values q [N, K] (0..15, K % 8 == 0) along K: int32 [K / 8, N] whose bits
    4j..4j+3 of word [r, n] hold q[n, 8r + j] (the W4A16 GEMM's weight layout: a row of the
    packed tensor is contiguous over N, so a tile's loads coalesce)."""
    n, k = q.shape
    if k % 8:
        raise ValueError(f"int4 packing along K needs K % 8 == 0, got K = {k}")
    v = q.to(torch.int32).t().reshape(k // 8, 8, n)
    out = torch.zeros(k // 8, n, dtype=torch.int32, device=q.device)
    for j in range(8):
        out |= v[:, j] << (4 * j)
    return out


def int4_unpack_k(qweight: torch.Tensor) -> torch.Tensor:
    """The inverse of `int4_pack_k`: int32 [K / 8, N] -> int32 [N, K] in 0..15."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    values = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # [K / 8, 8, N]
    return values.reshape(-1, qweight.shape[1]).t()


def w4a16_dequantize_ref(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The real weight [N, K] of a W4A16 one: (q[n, k] - zeros[k // g, n]) * scales[k // g, n],
    computed in fp32, in `dtype`.

    Args:
        qweight: int32 [K / 8, N] (`int4_pack_k`); scales, zeros: [ceil(K / g), N] (zeros hold
        integers 0..15; 8 for a symmetric format); group: g.
    """
    q = int4_unpack_k(qweight).float()
    k = q.shape[1]
    s = scales.float().t().repeat_interleave(group, dim=1)[:, :k]
    z = zeros.float().t().repeat_interleave(group, dim=1)[:, :k]
    return ((q - z) * s).to(dtype)


def w4a16_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequant(W).T + bias in x.dtype (weight-only: x is not quantized)."""
    return F.linear(x, w4a16_dequantize_ref(qweight, scales, zeros, group, x.dtype), bias)
