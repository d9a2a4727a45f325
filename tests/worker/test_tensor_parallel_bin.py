"""Tensor parallelism on .bin checkpoints: each rank copies only its slices out of a
memory-mapped `torch.load(weights_only=True)`; a legacy (pre-zip) .bin still loads, whole.

Checked per rank, in process: past loading a .bin checkpoint runs what a safetensors one does,
and test_tensor_parallel.py runs this same Llama config (2 layers, tied head, 99 rows) over a
TP=2 grid from safetensors; one rank of a .bin against transformers is test_weight_loading's."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from splitserve.worker import weight_files
from splitserve.worker.checkpoint_slices import LazyTensor, read_shard_lazily
from splitserve.worker.config import WorkerConfig

# Tensors every rank holds whole; everything else is read through a narrowed slice.
REPLICATED = ("norm.weight",)
SLICED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bin_checkpoint(checkpoint) -> pathlib.Path:
    # NOTE: 99 rows do not split evenly over 2 ranks; the tied lm_head is the embedding.
    return checkpoint("llama_tp_bin", num_layers=2, tie=True, vocab_size=99, safe=False)


def _legacy_copy(path: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """`path` with its pytorch_model.bin rewritten in torch's legacy (non-zip) layout."""
    shutil.copytree(path, out)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    torch.save(state, out / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return out


@pytest.fixture
def spies(monkeypatch):
    """Names of the lazy tensors read whole / narrowed, and the torch.load calls' options."""
    seen: dict[str, list] = {"materialize": [], "narrow": [], "torch.load": []}
    for method in ("materialize", "narrow"):
        original = getattr(LazyTensor, method)

        def spy(self, *args, _original=original, _method=method):
            seen[_method].append(self.name)
            return _original(self, *args)

        monkeypatch.setattr(LazyTensor, method, spy)
    load = torch.load

    def load_spy(*args, **kwargs):
        seen["torch.load"].append((kwargs.get("mmap"), kwargs.get("weights_only")))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load_spy)
    return seen


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_each_rank_reads_only_its_slices_of_a_bin(checkpoint, tmp_path, spies, layout):
    """Both ranks of 2: what each reads whole or narrowed, and every parameter it holds is
    exactly its rows / columns of the checkpoint."""
    from splitserve.worker.model_loader import load_model

    path = _bin_checkpoint(checkpoint)
    if layout == "legacy":
        path = _legacy_copy(path, tmp_path / "legacy")
    assert weight_files.find_weight_files(path, "auto").kind == "pt"
    ckpt = torch.load(path / "pytorch_model.bin", weights_only=True)
    for rank in range(2):
        for seen in spies.values():
            seen.clear()
        model = load_model(
            WorkerConfig(model=str(path), tensor_parallel_size=2, tp_rank=rank, max_model_len=64)
        ).model
        # The zip layout is memory-mapped; the legacy one cannot be, and is read whole after
        # the mapped attempt fails. Never without weights_only.
        expected = [(True, True)] if layout == "zip" else [(True, True), (None, True)]
        assert spies["torch.load"] == expected
        whole, narrowed = spies["materialize"], spies["narrow"]
        assert whole and all(n.endswith(REPLICATED) for n in whole), whole
        assert {n.split(".")[-2] for n in narrowed if ".layers." in n} == set(SLICED)
        assert not set(whole) & set(narrowed)
        assert "model.embed_tokens.weight" in narrowed  # vocabulary rows, read twice (tied)
        _assert_rank_slices(model.state_dict(), ckpt, rank)


def _assert_rank_slices(params, ckpt, rank: int) -> None:
    """Rank `rank` of 2 holds exactly its slices of layer 1 and of the vocabulary."""
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    # head_dim 8: 4 query heads -> 2 a rank; 2 KV heads -> 1; 64 MLP features -> 32.
    qs, ks, ms = (slice(n * rank, n * rank + n) for n in (16, 8, 32))
    q, k, v = (ckpt[f"{attn}.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(params[f"{attn}.qkv_proj.weight"], torch.cat([q[qs], k[ks], v[ks]]))
    assert torch.equal(params[f"{attn}.o_proj.weight"], ckpt[f"{attn}.o_proj.weight"][:, qs])
    gate, up = (ckpt[f"{mlp}.{p}_proj.weight"] for p in ("gate", "up"))
    assert torch.equal(params[f"{mlp}.gate_up_proj.weight"], torch.cat([gate[ms], up[ms]]))
    assert torch.equal(params[f"{mlp}.down_proj.weight"], ckpt[f"{mlp}.down_proj.weight"][:, ms])
    vocab = ckpt["model.embed_tokens.weight"]  # 99 rows, 50 a rank: rank 1 has 49 and a pad
    rows = vocab[50 * rank : 50 * rank + 50]
    n = len(rows)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the head is tied
        assert params[name].shape[0] == 50, name
        assert torch.equal(params[name][:n], rows), name
        assert not params[name][n:].any(), name


def test_a_lazy_bin_slice_is_a_copy(checkpoint):
    path = _bin_checkpoint(checkpoint)
    name = "model.layers.0.mlp.down_proj.weight"
    (tensor,) = [t for n, t in read_shard_lazily(path / "pytorch_model.bin", "pt", name.__eq__)]
    expected = torch.load(path / "pytorch_model.bin", weights_only=True)[name]
    assert tensor.shape == expected.shape and tensor.dim() == 2
    cols = tensor.narrow(1, 32, 32)
    assert torch.equal(cols, expected[:, 32:]) and cols.is_contiguous()
    cols.zero_()  # the caller owns what it got: the mapping (and the next read) is untouched
    assert torch.equal(tensor[10:20], expected[10:20])
    assert torch.equal(tensor.materialize(), expected)


def test_a_bin_that_runs_code_is_refused_by_the_lazy_reader(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "payload": _Mkdir(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refusing to load .*weights_only=True"):
        read_shard_lazily(tmp_path / "pytorch_model.bin", "pt", lambda n: True)
    assert not marker.exists()


class _Mkdir:
    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))
