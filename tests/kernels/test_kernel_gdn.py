"""Gated delta rule kernels (chunked prefill over packed sequences, fused recurrent decode over
state slots) against their torch references (`kernels.torch_gdn`), each chunked form against
the step-by-step recurrence, and both against transformers' own torch implementation
(`torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule` of Qwen3-Next) as the
independent reference: ragged lengths, lengths that are not a multiple of the chunk,
one-token sequences, grouped value heads, non-zero initial states read from slots and final
states written back."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from splitserve.kernels import dispatch, gated_delta, torch_gdn

from .kernel_test_utils import DEVICE

# (atol, rtol): fp32 sums in another order (a triangular solve per chunk vs rank-1 steps).
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2)}

LENGTHS = [[1], [5, 1, 37], [33, 64, 2, 1, 17]]
# (Hk, Hv, Dk, Dv): equal heads; two value heads per key head, Dv not a power of two; wide
# keys, whose Dv is split over three programs (the last one partial).
HEADS = [(2, 2, 16, 16), (1, 2, 32, 24), (1, 1, 128, 80)]


def _inputs(tokens, hk, hv, dk, dv, dtype):
    q = torch.randn(tokens, hk, dk, dtype=dtype)
    k = torch.randn(tokens, hk, dk, dtype=dtype)
    v = torch.randn(tokens, hv, dv, dtype=dtype)
    # Qwen3-Next's parametrisation: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b).
    g = -torch.rand(hv).add(0.1)[None, :] * torch.nn.functional.softplus(torch.randn(tokens, hv))
    beta = torch.sigmoid(torch.randn(tokens, hv))
    return q, k, v, g.float(), beta.float()


def _packed(lengths, num_slots):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.randperm(num_slots)[: len(lengths)].to(torch.int64)
    has_init = torch.rand(len(lengths)) < 0.6
    if len(lengths) > 1:
        has_init[0], has_init[1] = True, False  # both kinds in every multi-sequence case
    return cu, slots, has_init


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_chunk_kernel_matches_reference(dtype, lengths, heads):
    hk, hv, dk, dv = heads
    num_slots = 8
    cu, slots, has_init = _packed(lengths, num_slots)
    q, k, v, g, beta = _inputs(int(cu[-1]), hk, hv, dk, dv, dtype)
    states = torch.randn(num_slots, hv, dk, dv, dtype=dtype) * 0.5
    ref_states = states.clone()
    ref = torch_gdn.chunk_gated_delta_rule(
        q, k, v, g, beta, ref_states, cu.tolist(), slots.tolist(), has_init.tolist(), 16
    )
    got_states = states.clone().to(DEVICE)
    got = gated_delta.chunk_gated_delta_rule(
        *_dev(q, k, v, g, beta), got_states, *_dev(cu, slots, has_init), block_t=16
    )
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=atol, rtol=rtol)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(got_states.cpu()[untouched], states[untouched])


@pytest.mark.parametrize("block_t", [16, 32])
def test_chunk_kernel_without_states_matches_recurrence(block_t):
    """No state cache: every sequence starts from zeros, whatever the chunk tiling."""
    lengths = [45, 3, 20]
    cu = torch.tensor([0, 45, 48, 68], dtype=torch.int32)
    q, k, v, g, beta = _inputs(68, 2, 4, 16, 16, torch.float32)
    got = gated_delta.chunk_gated_delta_rule(
        *_dev(q, k, v, g, beta), None, cu.to(DEVICE), None, None, block_t=block_t
    ).cpu()
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        want, _ = torch_gdn.gated_delta_recurrence(q[sl], k[sl], v[sl], g[sl], beta[sl])
        torch.testing.assert_close(got[sl], want, atol=2e-4, rtol=2e-4)
        start += n


@pytest.mark.parametrize("length", [1, 15, 16, 50])
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_torch_chunk_equals_recurrence_and_transformers(length, heads):
    hk, hv, dk, dv = heads
    q, k, v, g, beta = _inputs(length, hk, hv, dk, dv, torch.float32)
    init = torch.randn(hv, dk, dv) * 0.5
    step_o, step_s = torch_gdn.gated_delta_recurrence(q, k, v, g, beta, init)
    chunk_o, chunk_s = torch_gdn.chunk_gated_delta_rule_one(q, k, v, g, beta, 16, init)
    torch.testing.assert_close(chunk_o, step_o, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(chunk_s, step_s, atol=2e-4, rtol=2e-4)
    kw = {"initial_state": init[None], "output_final_state": True, "use_qk_l2norm_in_kernel": True}
    args = (q[None], k[None], v[None], g[None], beta[None])
    hf_o, hf_s = hf.torch_chunk_gated_delta_rule(*args, chunk_size=16, **kw)
    torch.testing.assert_close(chunk_o, hf_o[0], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(chunk_s, hf_s[0], atol=2e-4, rtol=2e-4)
    hf_o, hf_s = hf.torch_recurrent_gated_delta_rule(*args, **kw)
    torch.testing.assert_close(step_o, hf_o[0], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(step_s, hf_s[0], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("lengths", [[37], [5, 64, 17]], ids=str)
def test_chunk_kernel_equals_transformers_per_sequence(lengths):
    """Packed, ragged, from non-zero initial states: each sequence's output and final state
    equal transformers' chunked rule run on that sequence alone."""
    hk, hv, dk, dv = 1, 2, 32, 24
    num_slots = 6
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.arange(len(lengths), dtype=torch.int64) + 2
    has_init = torch.ones(len(lengths), dtype=torch.bool)
    q, k, v, g, beta = _inputs(int(cu[-1]), hk, hv, dk, dv, torch.float32)
    states = torch.randn(num_slots, hv, dk, dv) * 0.5
    init = states.clone()
    got_states = states.clone().to(DEVICE)
    got = gated_delta.chunk_gated_delta_rule(
        *_dev(q, k, v, g, beta), got_states, *_dev(cu, slots, has_init), block_t=16
    ).cpu()
    for i in range(len(lengths)):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        hf_o, hf_s = hf.torch_chunk_gated_delta_rule(
            q[None, sl],
            k[None, sl],
            v[None, sl],
            g[None, sl],
            beta[None, sl],
            chunk_size=64,
            initial_state=init[slots[i]][None],
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        torch.testing.assert_close(got[sl], hf_o[0], atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(got_states.cpu()[slots[i]], hf_s[0], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_recurrent_kernel_matches_reference_and_transformers(dtype, heads):
    hk, hv, dk, dv = heads
    batch, num_slots = 5, 9
    q, k, v, g, beta = _inputs(batch, hk, hv, dk, dv, dtype)
    slots = torch.randperm(num_slots)[:batch]
    states = torch.randn(num_slots, hv, dk, dv, dtype=dtype) * 0.5
    ref_states = states.clone()
    ref = torch_gdn.fused_recurrent_gated_delta_rule(q, k, v, g, beta, ref_states, slots)
    got_states = states.clone().to(DEVICE)
    got = gated_delta.fused_recurrent_gated_delta_rule(
        *_dev(q, k, v, g, beta), got_states, slots.to(DEVICE)
    )
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=atol, rtol=rtol)
    if dtype == torch.float32:
        hf_o, hf_s = hf.torch_recurrent_gated_delta_rule(
            q[:, None],
            k[:, None],
            v[:, None],
            g[:, None],
            beta[:, None],
            initial_state=states[slots],
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        torch.testing.assert_close(got.cpu(), hf_o[:, 0], atol=atol, rtol=rtol)
        torch.testing.assert_close(got_states.cpu()[slots], hf_s, atol=atol, rtol=rtol)


def test_decode_steps_continue_a_chunked_prefill():
    """Prefill a prompt through the chunk kernel, then decode token by token through the
    recurrent kernel from the same slot: the outputs equal the recurrence over the whole."""
    length, steps = 23, 4
    q, k, v, g, beta = _inputs(length + steps, 2, 4, 16, 16, torch.float32)
    states = torch.zeros(3, 4, 16, 16, device=DEVICE)
    slot = torch.tensor([1], device=DEVICE)
    cu = torch.tensor([0, length], dtype=torch.int32, device=DEVICE)
    outs = [
        gated_delta.chunk_gated_delta_rule(
            *_dev(q[:length], k[:length], v[:length], g[:length], beta[:length]),
            states,
            cu,
            slot,
            torch.tensor([False], device=DEVICE),
        ).cpu()
    ]
    for t in range(length, length + steps):
        sl = slice(t, t + 1)
        outs.append(
            gated_delta.fused_recurrent_gated_delta_rule(
                *_dev(q[sl], k[sl], v[sl], g[sl], beta[sl]), states, slot
            ).cpu()
        )
    want, want_state = torch_gdn.gated_delta_recurrence(q, k, v, g, beta)
    torch.testing.assert_close(torch.cat(outs), want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(states[1].cpu(), want_state, atol=2e-4, rtol=2e-4)


def test_dispatch_uses_torch_on_cpu_tensors():
    cu = torch.tensor([0, 7], dtype=torch.int32)
    q, k, v, g, beta = _inputs(7, 2, 2, 16, 16, torch.float32)
    states = torch.zeros(2, 2, 16, 16)
    got = dispatch.chunk_gated_delta_rule(
        q, k, v, g, beta, states, cu, torch.tensor([1]), torch.tensor([False]), backend="torch"
    )
    want, want_state = torch_gdn.gated_delta_recurrence(q, k, v, g, beta)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(states[1], want_state, atol=2e-4, rtol=2e-4)
    assert torch.equal(states[0], torch.zeros(2, 16, 16))


def test_launcher_rejects_bad_shapes():
    q, k, v, g, beta = _inputs(4, 2, 3, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of key heads"):
        gated_delta.fused_recurrent_gated_delta_rule(
            q, k, v, g, beta, torch.zeros(2, 3, 16, 16), torch.tensor([0, 1, 0, 1])
        )
