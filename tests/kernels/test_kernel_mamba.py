"""Mamba2 kernels (causal conv1d prefill/update, SSD chunked scan, selective state update)
against their torch references (`kernels.torch_mamba`), and the chunked scan against the
step-by-step recurrence: ragged packed sequences, lengths that are not a multiple of the
chunk, one-token sequences, non-zero initial states read from slots and final states written
back."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import causal_conv1d, ssd_scan, torch_mamba

from .kernel_test_utils import DEVICE

# (atol, rtol): fp32 sums in a different order (chunked products vs per-sequence einsums).
SCAN_TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2)}
CONV_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}

LENGTHS = [[1], [5, 1, 37], [33, 64, 2, 1, 17]]


def _packed(lengths, num_slots, seed_init=True):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.randperm(num_slots)[: len(lengths)].to(torch.int64)
    has_init = (
        torch.rand(len(lengths)) < 0.6 if seed_init else torch.zeros(len(lengths), dtype=bool)
    )
    if len(lengths) > 1:
        has_init[0], has_init[1] = True, False  # both kinds in every multi-sequence case
    return cu, slots, has_init


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("width", [4, 3, 2])
def test_conv1d_prefill_matches_reference(dtype, lengths, width):
    dim, num_slots = 40, 8
    cu, slots, has_init = _packed(lengths, num_slots)
    x = torch.randn(int(cu[-1]), dim, dtype=dtype)
    w = torch.randn(dim, width, dtype=dtype)
    bias = torch.randn(dim, dtype=dtype)
    states = torch.randn(num_slots, dim, width - 1, dtype=dtype)
    ref_states = states.clone()
    ref = torch_mamba.causal_conv1d_prefill(
        x, w, bias, ref_states, cu.tolist(), slots.tolist(), has_init.tolist()
    )
    got_states = states.clone().to(DEVICE)
    got = causal_conv1d.causal_conv1d_prefill(
        x.to(DEVICE),
        w.to(DEVICE),
        bias.to(DEVICE),
        got_states,
        cu.to(DEVICE),
        slots.to(DEVICE),
        has_init.to(DEVICE),
    )
    atol, rtol = CONV_TOL[dtype]
    torch.testing.assert_close(got.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=atol, rtol=rtol)
    # Slots of no sequence are untouched.
    others = [s for s in range(num_slots) if s not in slots.tolist()]
    assert torch.equal(got_states.cpu()[others], ref_states[others])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width", [4, 3, 2])
def test_conv1d_update_matches_reference(dtype, width):
    dim, num_slots = 72, 6
    slots = torch.tensor([4, 0, 3], dtype=torch.int64)
    x = torch.randn(3, dim, dtype=dtype)
    w, bias = torch.randn(dim, width, dtype=dtype), torch.randn(dim, dtype=dtype)
    states = torch.randn(num_slots, dim, width - 1, dtype=dtype)
    ref_states = states.clone()
    ref = torch_mamba.causal_conv1d_update(x, w, bias, ref_states, slots)
    got_states = states.clone().to(DEVICE)
    got = causal_conv1d.causal_conv1d_update(
        x.to(DEVICE), w.to(DEVICE), bias.to(DEVICE), got_states, slots.to(DEVICE)
    )
    atol, rtol = CONV_TOL[dtype]
    torch.testing.assert_close(got.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=atol, rtol=rtol)


def _ssm_inputs(tokens, heads=4, head_dim=24, groups=2, state=20, dtype=torch.float32):
    x = torch.randn(tokens, heads, head_dim, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(tokens, heads) - 1.0)
    A = -torch.rand(heads) * 2 - 0.1
    B = torch.randn(tokens, groups, state, dtype=dtype)
    C = torch.randn(tokens, groups, state, dtype=dtype)
    D = torch.randn(heads)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("block_q", [16, 32])
def test_ssd_scan_matches_reference(dtype, lengths, block_q):
    num_slots = 8
    cu, slots, has_init = _packed(lengths, num_slots)
    x, dt, A, B, C, D = _ssm_inputs(int(cu[-1]), dtype=dtype)
    states = torch.randn(num_slots, 4, 24, 20, dtype=dtype)
    ref_states = states.clone()
    ref = torch_mamba.ssd_chunk_scan(
        x, dt, A, B, C, D, 8, ref_states, cu.tolist(), slots.tolist(), has_init.tolist()
    )
    got_states = states.clone().to(DEVICE)
    got = ssd_scan.ssd_chunk_scan(
        *(t.to(DEVICE) for t in (x, dt, A, B, C, D)),
        got_states,
        cu.to(DEVICE),
        slots.to(DEVICE),
        has_init.to(DEVICE),
        block_q=block_q,
    )
    atol, rtol = SCAN_TOL[dtype]
    torch.testing.assert_close(got.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=atol, rtol=rtol)
    others = [s for s in range(num_slots) if s not in slots.tolist()]
    assert torch.equal(got_states.cpu()[others], ref_states[others])


def test_ssd_scan_without_states_starts_from_zeros():
    lengths = [19, 3]
    cu = torch.tensor([0, 19, 22], dtype=torch.int32)
    x, dt, A, B, C, D = _ssm_inputs(22)
    ref = torch_mamba.ssd_chunk_scan(x, dt, A, B, C, D, 8, None, cu.tolist(), None, None)
    got = ssd_scan.ssd_chunk_scan(
        *(t.to(DEVICE) for t in (x, dt, A, B, C, D)), None, cu.to(DEVICE), None, None
    )
    torch.testing.assert_close(got.cpu(), ref, atol=2e-4, rtol=2e-4)
    assert sum(lengths) == x.shape[0]


@pytest.mark.parametrize("length", [1, 7, 40])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_scan_equals_step_by_step_recurrence(length, chunk):
    x, dt, A, B, C, _ = _ssm_inputs(length)
    init = torch.randn(4, 24, 20)
    y_ref, s_ref = torch_mamba.ssd_recurrence(x, dt, A, B, C, init)
    y, s = torch_mamba.ssd_chunk_scan_one(x, dt, A, B, C, chunk, init)
    torch.testing.assert_close(y, y_ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(s, s_ref, atol=2e-4, rtol=2e-4)
    # The Triton scan, with the initial state in a slot, against the same recurrence.
    states = init[None].clone().to(DEVICE)
    got = ssd_scan.ssd_chunk_scan(
        *(t.to(DEVICE) for t in (x, dt, A, B, C)),
        None,
        states,
        torch.tensor([0, length], dtype=torch.int32, device=DEVICE),
        torch.zeros(1, dtype=torch.int64, device=DEVICE),
        torch.ones(1, dtype=torch.bool, device=DEVICE),
    )
    torch.testing.assert_close(got.cpu(), y_ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(states[0].cpu(), s_ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_selective_state_update_matches_reference_and_recurrence(dtype):
    num_slots = 5
    slots = torch.tensor([3, 1], dtype=torch.int64)
    x, dt, A, B, C, D = _ssm_inputs(2, dtype=dtype)
    states = torch.randn(num_slots, 4, 24, 20, dtype=dtype)
    ref_states = states.clone()
    ref = torch_mamba.selective_state_update(ref_states, x, dt, A, B, C, D, slots)
    got_states = states.clone().to(DEVICE)
    got = ssd_scan.selective_state_update(
        got_states, *(t.to(DEVICE) for t in (x, dt, A, B, C, D)), slots.to(DEVICE)
    )
    atol, rtol = SCAN_TOL[dtype]
    torch.testing.assert_close(got.cpu(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_states.cpu(), ref_states, atol=atol, rtol=rtol)
    if dtype == torch.float32:
        y1, s1 = torch_mamba.ssd_recurrence(x[:1], dt[:1], A, B[:1], C[:1], states[3])
        torch.testing.assert_close(got[0].cpu(), (y1[0] + x[0] * D[:, None]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_states[3].cpu(), s1, atol=1e-5, rtol=1e-5)
