"""Lightning attention kernels (block-wise packed prefill, decode step over state slots) against
their torch references (`kernels.torch_lightning`), the block-wise form against the step-by-step
recurrence, and both against transformers' `MiniMaxLightningAttention` (an independent
implementation): ragged packed sequences, lengths that are not a multiple of the block,
one-token sequences, non-zero initial states read from slots and final states written back."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import lightning_attention, torch_lightning

from .kernel_test_utils import DEVICE

# (atol, rtol): fp32 sums in a different order (block products vs per-sequence matmuls).
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2)}
LENGTHS = [[1], [5, 1, 37], [33, 64, 2, 1, 17]]


def _slope(heads: int) -> torch.Tensor:
    # MiniMax's rates (0.5 ** (8 h / H) style), spread so some heads forget fast, some slowly.
    return (0.5 ** (8 / heads)) ** (torch.arange(heads, dtype=torch.float32) + 1)


def _packed(lengths, num_slots):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.randperm(num_slots)[: len(lengths)].to(torch.int64)
    has_init = torch.rand(len(lengths)) < 0.6
    if len(lengths) > 1:
        has_init[0], has_init[1] = True, False  # both kinds in every multi-sequence case
    return cu, slots, has_init


def _qkv(tokens, heads, head_dim, value_dim, dtype):
    # Scaled so outputs stay O(1) over a few dozen tokens (no softmax normalises them).
    q = torch.randn(tokens, heads, head_dim, dtype=dtype) / head_dim**0.5
    k = torch.randn(tokens, heads, head_dim, dtype=dtype) / head_dim**0.5
    v = torch.randn(tokens, heads, value_dim, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("block_size", [16, 7, 64])
def test_blockwise_equals_recurrence(lengths, block_size):
    heads, head_dim = 3, 12
    init = torch.randn(heads, head_dim, head_dim)
    for n in lengths:
        q, k, v = _qkv(n, heads, head_dim, head_dim, torch.float32)
        slope = _slope(heads)
        o_b, s_b = torch_lightning.lightning_block_one(q, k, v, slope, block_size, init)
        o_r, s_r = torch_lightning.lightning_recurrence(q, k, v, slope, init)
        torch.testing.assert_close(o_b, o_r, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s_b, s_r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("dims", [(16, 16), (24, 40)], ids=str)
def test_prefill_matches_reference(dtype, lengths, dims):
    heads, num_slots = 3, 8
    head_dim, value_dim = dims
    cu, slots, has_init = _packed(lengths, num_slots)
    q, k, v = _qkv(int(cu[-1]), heads, head_dim, value_dim, dtype)
    slope = _slope(heads)
    states = torch.randn(num_slots, heads, head_dim, value_dim, dtype=dtype) * 0.3
    ref_states = states.clone()
    ref = torch_lightning.lightning_prefill(
        q, k, v, slope, 16, ref_states, cu.tolist(), slots.tolist(), has_init.tolist()
    )
    got_states = states.clone().to(DEVICE)
    got = lightning_attention.lightning_prefill(
        q.to(DEVICE),
        k.to(DEVICE),
        v.to(DEVICE),
        slope.to(DEVICE),
        got_states,
        cu.to(DEVICE),
        slots.to(DEVICE),
        has_init.to(DEVICE),
        block_t=16,
    )
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=atol, rtol=rtol)
    others = [s for s in range(num_slots) if s not in slots.tolist()]
    assert torch.equal(got_states.cpu()[others], states[others])


def test_prefill_without_state_cache_starts_from_zeros():
    heads, head_dim = 2, 16
    lengths = [19, 3]
    cu = torch.tensor([0, 19, 22], dtype=torch.int32)
    q, k, v = _qkv(22, heads, head_dim, head_dim, torch.float32)
    slope = _slope(heads)
    got = lightning_attention.lightning_prefill(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), slope.to(DEVICE), None, cu.to(DEVICE), None, None
    )
    for i, n in enumerate(lengths):
        s = int(cu[i])
        want, _ = torch_lightning.lightning_recurrence(
            q[s : s + n], k[s : s + n], v[s : s + n], slope
        )
        torch.testing.assert_close(got.cpu()[s : s + n], want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dims", [(16, 16), (24, 40)], ids=str)
def test_decode_matches_reference(dtype, dims):
    heads, num_slots = 4, 6
    head_dim, value_dim = dims
    slots = torch.tensor([4, 0, 3], dtype=torch.int64)
    q, k, v = _qkv(3, heads, head_dim, value_dim, dtype)
    slope = _slope(heads)
    states = torch.randn(num_slots, heads, head_dim, value_dim, dtype=dtype)
    ref_states = states.clone()
    ref = torch_lightning.lightning_decode(q, k, v, slope, ref_states, slots)
    got_states = states.clone().to(DEVICE)
    got = lightning_attention.lightning_decode(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), slope.to(DEVICE), got_states, slots.to(DEVICE)
    )
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=atol, rtol=rtol)
    assert torch.equal(got_states.cpu()[[1, 2, 5]], states[[1, 2, 5]])
    # The decode step is one step of the recurrence.
    for b, slot in enumerate(slots.tolist()):
        want, _ = torch_lightning.lightning_recurrence(
            q[b : b + 1].float(), k[b : b + 1].float(), v[b : b + 1].float(), slope, states[slot]
        )
        torch.testing.assert_close(ref[b].float(), want[0], atol=atol, rtol=rtol)


def _hf_layer(heads, head_dim, block_size, layer_idx=1, num_layers=4):
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = MiniMaxConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        head_dim=head_dim,
        num_hidden_layers=num_layers,
        block_size=block_size,
    )
    layer = MiniMaxLightningAttention(cfg, layer_idx).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def _our_layer(layer, hidden, attend):
    """transformers' projections, norm and gate around our attention `attend(q, k, v, slope)`."""
    heads, head_dim = layer.num_attention_heads, layer.head_dim
    qkv = layer.act_fn(layer.qkv_proj(hidden)).view(hidden.shape[0], heads, 3 * head_dim)
    q, k, v = (t.contiguous() for t in qkv.split(head_dim, dim=-1))
    o, state = attend(q, k, v, layer.slope_rate.view(-1))
    o = layer.norm(o.reshape(hidden.shape[0], -1))
    return layer.out_proj(torch.sigmoid(layer.output_gate(hidden)) * o), state


@torch.inference_mode()
@pytest.mark.parametrize("length", [1, 37, 64])
def test_kernels_match_transformers_minimax(length):
    """transformers' block-wise prefill (block 16) and its per-token cached path, against the
    Triton prefill and decode kernels on the same projections."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    heads, head_dim = 2, 16
    layer = _hf_layer(heads, head_dim, block_size=16)
    hidden = torch.randn(1, length + 2, heads * head_dim)
    prompt, steps = hidden[:, :length], hidden[:, length:]
    cache = MiniMaxCache()
    want, want_state = layer(prompt, None, None, cache=cache)
    slots = torch.tensor([1], dtype=torch.int64)
    states = torch.zeros(3, heads, head_dim, head_dim, device=DEVICE)

    def prefill(q, k, v, slope):
        o = lightning_attention.lightning_prefill(
            q.to(DEVICE),
            k.to(DEVICE),
            v.to(DEVICE),
            slope.contiguous().to(DEVICE),
            states,
            torch.tensor([0, length], dtype=torch.int32, device=DEVICE),
            slots.to(DEVICE),
            torch.tensor([False], device=DEVICE),
        )
        return o.cpu(), states[1].cpu()

    got, got_state = _our_layer(layer, prompt[0], prefill)
    torch.testing.assert_close(got, want[0], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got_state, want_state[0], atol=2e-4, rtol=2e-4)

    def decode(q, k, v, slope):
        o = lightning_attention.lightning_decode(
            q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), slope.contiguous().to(DEVICE), states,
            slots.to(DEVICE),
        )  # fmt: skip
        return o.cpu(), states[1].cpu()

    for i in range(steps.shape[1]):
        want, want_state = layer(steps[:, i : i + 1], None, None, cache=cache)
        got, got_state = _our_layer(layer, steps[0, i : i + 1], decode)
        torch.testing.assert_close(got, want[0], atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(got_state, want_state[0], atol=2e-4, rtol=2e-4)


def test_half_inputs_with_fp32_states():
    """The model keeps the state in fp32 under a half-precision model: fp16 q, k, v with fp32
    slots, prefill then a decode step, against the torch path."""
    heads, head_dim, num_slots = 2, 16, 4
    cu, slots, has_init = _packed([21, 5], num_slots)
    q, k, v = _qkv(26, heads, head_dim, head_dim, torch.float16)
    slope = _slope(heads)
    states = torch.randn(num_slots, heads, head_dim, head_dim) * 0.3
    ref_states = states.clone()
    ref = torch_lightning.lightning_prefill(
        q, k, v, slope, 16, ref_states, cu.tolist(), slots.tolist(), has_init.tolist()
    )
    got_states = states.clone().to(DEVICE)
    got = lightning_attention.lightning_prefill(
        *(t.to(DEVICE) for t in (q, k, v, slope)),
        got_states,
        cu.to(DEVICE),
        slots.to(DEVICE),
        has_init.to(DEVICE),
    )
    assert got.dtype == torch.float16 and got_states.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=1e-3, rtol=1e-3)
    qd, kd, vd = _qkv(2, heads, head_dim, head_dim, torch.float16)
    ref = torch_lightning.lightning_decode(qd, kd, vd, slope, ref_states, slots)
    got = lightning_attention.lightning_decode(
        *(t.to(DEVICE) for t in (qd, kd, vd, slope)), got_states, slots.to(DEVICE)
    )
    torch.testing.assert_close(got.cpu(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=1e-3, rtol=1e-3)
