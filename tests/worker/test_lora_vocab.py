"""Reading an adapter's added tokens (worker/lora_vocab.py) and its refusals, on synthetic
tensors named as peft saves them; the parity with peft is tests/models/test_lora_vocab.py."""

from __future__ import annotations

import pytest
import torch

from splitserve.common.lora import AdapterConfig
from splitserve.worker.lora_vocab import (
    EmbedStep,
    LoRAEmbedding,
    extend_logits,
    read_extra_vocab,
    split_vocab_tensors,
)

V, H = 10, 4
PREFIX = "base_model.model."


def _cfg(**kw) -> AdapterConfig:
    return AdapterConfig(4, 8.0, False, ("q_proj",), **kw)


def _read(tmp_path, tensors, cfg, limit=8, tied=False, base=None):
    _, vocab = split_vocab_tensors(tensors)
    base = base or {"embed_tokens": torch.randn(V, H), "lm_head": torch.randn(V, H)}
    return read_extra_vocab(tmp_path, cfg, vocab, base, V, tied, limit)


def test_split_keeps_lora_tensors_apart():
    lora_key = PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors = {
        lora_key: torch.zeros(1),
        PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(1),
        PREFIX + "lm_head.modules_to_save.default.weight": torch.zeros(1),
    }
    lora, vocab = split_vocab_tensors(tensors)
    assert list(lora) == [lora_key]
    assert set(vocab) == {
        ("embed_tokens", ".token_adapter.trainable_tokens_delta"),
        ("lm_head", ".modules_to_save.weight"),
    }


def test_modules_to_save_rows_past_the_base(tmp_path):
    base = {"embed_tokens": torch.randn(V, H), "lm_head": torch.randn(V, H)}
    new_e, new_h = torch.randn(3, H), torch.randn(3, H)
    tensors = {
        PREFIX + "model.embed_tokens.modules_to_save.weight": torch.cat(
            [base["embed_tokens"], new_e]
        ),
        PREFIX + "lm_head.modules_to_save.weight": torch.cat([base["lm_head"], new_h]),
    }
    cfg = _cfg(modules_to_save=("embed_tokens", "lm_head"))
    extra = _read(tmp_path, tensors, cfg, base=base)
    assert extra.num_tokens == 3
    assert torch.equal(extra.embed, new_e) and torch.equal(extra.lm_head, new_h)
    # A base row changed: refused, naming what is supported.
    changed = torch.cat([base["embed_tokens"], new_e])
    changed[2] += 1
    tensors[PREFIX + "model.embed_tokens.modules_to_save.weight"] = changed
    with pytest.raises(ValueError, match="changes 1 rows of the base vocabulary"):
        _read(tmp_path, tensors, cfg, base=base)


def test_more_tokens_than_the_flag_are_refused_by_name(tmp_path):
    ids = list(range(V, V + 5))
    tensors = {
        PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta": torch.randn(5, H),
    }
    cfg = _cfg(trainable_token_indices=(("embed_tokens", tuple(ids)),))
    with pytest.raises(ValueError, match="adds 5 tokens .* more than --lora-extra-vocab-size 4"):
        _read(tmp_path, tensors, cfg, limit=4, tied=True)
    extra = _read(tmp_path, tensors, cfg, limit=5, tied=True)
    assert torch.equal(extra.lm_head, extra.embed)  # tied: lm_head rows are the embedding's
    with pytest.raises(ValueError, match="lm_head has no rows for added tokens"):
        _read(tmp_path, tensors, cfg, limit=5, tied=False)


def test_retrained_base_tokens_are_refused(tmp_path):
    tensors = {
        PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta": torch.randn(2, H),
    }
    cfg = _cfg(trainable_token_indices=(("embed_tokens", (3, V)),))
    with pytest.raises(ValueError, match=r"trainable_token_indices \[3\] retrain tokens"):
        _read(tmp_path, tensors, cfg, tied=True)


def test_new_embeddings_file(tmp_path):
    from safetensors.torch import save_file

    rows_in, rows_out = torch.randn(2, H), torch.randn(2, H)
    save_file(
        {"input_embeddings": rows_in, "output_embeddings": rows_out},
        str(tmp_path / "new_embeddings.safetensors"),
    )
    extra = _read(tmp_path, {}, _cfg())
    assert torch.equal(extra.embed, rows_in) and torch.equal(extra.lm_head, rows_out)


def test_embedding_and_logits_per_row():
    base = torch.nn.Embedding(V, H)
    added = torch.randn(3, H)  # adapter 0 adds 2 rows, adapter 1 adds 1
    step = EmbedStep(added, torch.tensor([0, 0, 2, 2]))
    emb = LoRAEmbedding(base, lambda: step)
    ids = torch.tensor([V + 1, 5, V, 7])
    out = emb(ids)
    assert torch.equal(out[0], added[1]) and torch.equal(out[2], added[2])
    assert torch.equal(out[1], base.weight[5]) and torch.equal(out[3], base.weight[7])
    hidden, logits = torch.randn(3, H), torch.randn(3, V)
    head = torch.randn(2, H)
    wide = extend_logits(hidden, logits, V + 4, [(torch.tensor([1]), head)])
    assert wide.shape == (3, V + 4)
    assert torch.equal(wide[:, :V], logits)
    assert torch.allclose(wide[1, V : V + 2], hidden[1] @ head.t())
    assert torch.isinf(wide[0, V:]).all() and torch.isinf(wide[1, V + 2 :]).all()


def test_grammar_rows_never_sample_added_tokens():
    """A grammar mask speaks for the base vocabulary: its rows get -inf past it, other rows
    keep the added tokens."""
    from splitserve.worker.sampler import Sampler, SamplingMetadata

    logits = torch.zeros(2, V + 3)
    logits[:, V + 1] = 50.0  # an added token wins both rows unmasked
    bitmask = torch.full((2, 1), -1, dtype=torch.int32)  # the grammar allows all base tokens
    meta = SamplingMetadata(torch.zeros(2), all_greedy=True, all_random=False)
    meta.bitmask, meta.bitmask_rows, meta.bitmask_vocab = bitmask, torch.tensor([0]), V
    sampled, _ = Sampler(torch.Generator())(logits, meta)
    assert sampled[0].item() < V
    assert sampled[1].item() == V + 1
