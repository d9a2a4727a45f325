"""The linear seam on CPU float32: oneDNN on a packed weight that replaces the plain one
(default; one copy, not two) or on the plain weight, the same outputs as torch's linear, one row on torch's linear,
tied weights kept plain, the env switch."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from splitserve.worker import cpu_linear
from splitserve.worker.config import WorkerConfig
from splitserve.worker.linear import Linear, QKVLinear, process_weights_after_loading
from splitserve.worker.model_loader import load_model

from .utils import model_forward

pytestmark = pytest.mark.skipif(
    not cpu_linear.onednn_linear_available(), reason="this torch build has no oneDNN linear ops"
)

TOKENS = [3, 17, 42, 8, 91, 5, 11]


@pytest.fixture
def packed(monkeypatch):
    monkeypatch.setenv(cpu_linear.ONEDNN_LINEAR_ENV, "packed")


def _filled(layer: Linear) -> Linear:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    return layer


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 17, 64, cpu_linear.MAX_ROWS + 1, 1200])
def test_packed_linear_matches_torch(rows, packed):
    torch.manual_seed(0)
    layer = _filled(QKVLinear(24, 4, 2, 6, bias=True))
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(rows, 24)
    assert process_weights_after_loading(layer) == 1
    assert cpu_linear.is_packed(layer.weight)
    torch.testing.assert_close(
        layer(x), torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("mode", ["plain", "packed"])
def test_leading_dims_and_strided_input(monkeypatch, mode):
    monkeypatch.setenv(cpu_linear.ONEDNN_LINEAR_ENV, mode)
    torch.manual_seed(0)
    layer = _filled(Linear(16, 8, bias=False))
    weight = layer.weight.detach().clone()
    process_weights_after_loading(layer)
    x = torch.randn(3, 16, 5).transpose(1, 2)  # [3, 5, 16], not contiguous
    torch.testing.assert_close(layer(x), x @ weight.t(), atol=1e-4, rtol=1e-4)


def test_the_plain_weight_is_freed(packed):
    """Packing replaces the weight: nothing keeps the plain tensor alive (no second copy)."""
    layer = _filled(Linear(256, 512, bias=True))
    plain = weakref.ref(layer.weight)
    bytes_before = sum(p.numel() * p.element_size() for p in layer.parameters())
    process_weights_after_loading(layer)
    gc.collect()
    assert plain() is None
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert sum(p.numel() * p.element_size() for p in layer.parameters()) == bytes_before
    assert cpu_linear.is_packed(layer.weight)
    assert [p for p in layer.parameters() if p.layout == torch.strided] == [layer.bias]


def test_state_dict_gives_plain_weights(packed):
    layer = _filled(Linear(16, 8))
    expected = {k: v.clone() for k, v in layer.state_dict().items()}
    process_weights_after_loading(layer)
    state = layer.state_dict()
    assert state.keys() == expected.keys()
    for k in expected:
        assert state[k].layout == torch.strided
        torch.testing.assert_close(state[k], expected[k])


def test_other_dtypes_and_the_env_switch_stay_plain(monkeypatch):
    half = Linear(16, 8).to(torch.bfloat16)
    assert process_weights_after_loading(half) == 0 and half.weight.layout == torch.strided
    monkeypatch.setenv(cpu_linear.ONEDNN_LINEAR_ENV, "0")
    layer = Linear(16, 8)
    assert process_weights_after_loading(layer) == 0 and layer.weight.layout == torch.strided


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 700])
def test_plain_mode_keeps_the_weight_and_matches_torch(monkeypatch, rows):
    """`plain`: the same weight tensor afterwards; several rows through oneDNN, one row
    through torch's linear."""
    monkeypatch.setenv(cpu_linear.ONEDNN_LINEAR_ENV, "plain")
    torch.manual_seed(0)
    layer = _filled(Linear(40, 24))
    weight = layer.weight
    x = torch.randn(rows, 40)
    expected = torch.nn.functional.linear(x, weight, layer.bias)
    calls = []
    real = cpu_linear.onednn_linear
    monkeypatch.setattr(cpu_linear, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    assert process_weights_after_loading(layer) == 1
    assert layer.weight is weight and layer.weight.layout == torch.strided
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    assert calls == ([] if rows == 1 else [1])


def test_the_default_is_packed(monkeypatch):
    monkeypatch.delenv(cpu_linear.ONEDNN_LINEAR_ENV, raising=False)
    assert cpu_linear.mode() == "packed"
    layer = _filled(Linear(16, 8))
    assert process_weights_after_loading(layer) == 1 and cpu_linear.is_packed(layer.weight)


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_linear.ONEDNN_LINEAR_ENV, "fast")
    with pytest.raises(ValueError, match="'fast'"):
        process_weights_after_loading(Linear(4, 4))


def _load(path, monkeypatch, mode: str):
    monkeypatch.setenv(cpu_linear.ONEDNN_LINEAR_ENV, mode)
    return load_model(WorkerConfig(model=str(path))).model


@pytest.mark.parametrize("tie", [False, True])
def test_loaded_model_packs_all_but_a_tied_head(checkpoint, monkeypatch, tie):
    path = checkpoint(f"llama_tie_{tie}", tie=tie)
    model = _load(path, monkeypatch, "packed")
    plain = _load(path, monkeypatch, "0")
    default = _load(path, monkeypatch, "plain")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    assert {n for n, m in linears.items() if not cpu_linear.is_packed(m.weight)} == (
        {"lm_head"} if tie else set()
    )
    if tie:  # the head still is the embedding, not a copy of it
        assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = model_forward(plain, TOKENS)
    torch.testing.assert_close(model_forward(model, TOKENS), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model_forward(default, TOKENS), expected, atol=1e-4, rtol=1e-4)
    assert not any(cpu_linear.is_packed(p) for p in default.parameters())


def test_row_buckets_are_few_and_tight():
    """oneDNN sees few distinct row counts (its per-shape cache stays bounded), each at most a
    third padding."""
    buckets = {cpu_linear.row_bucket(n) for n in range(1, cpu_linear.MAX_ROWS + 1)}
    assert len(buckets) <= 2 * cpu_linear.MAX_ROWS.bit_length()
    assert max(buckets) == cpu_linear.MAX_ROWS
    for n in range(1, cpu_linear.MAX_ROWS + 1):
        assert 0 <= cpu_linear.row_bucket(n) - n <= cpu_linear.row_bucket(n) // 3, n
