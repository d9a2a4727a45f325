"""Sampler: each parameter moves the distribution the way vLLM's does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.common import messages as msg
from splitserve.worker.input_batch import InputBatch
from splitserve.worker.sampler import Sampler

V = 16
EOS = [0]


def _metadata(
    params: list[msg.SamplingParams],
    prompt: list[int] | None = None,
    outputs: list[list[int]] | None = None,
):
    batch = InputBatch(
        max_model_len=64,
        block_size=4,
        vocab_size=V,
        num_blocks=8,
        device=torch.device("cpu"),
        initial_rows=2,
    )
    prompt = prompt or [3, 4]
    for i, p in enumerate(params):
        out = outputs[i] if outputs else []
        batch.add(
            msg.NewRequest(
                request_id=str(i),
                token_ids=prompt + out,
                num_prompt_tokens=len(prompt),
                sampling_params=p,
            )
        )
    rows = np.array([batch.rows[str(i)] for i in range(len(params))])
    return batch.sampling_metadata(rows, EOS)


def _sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed))


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 2


def _params(**kwargs) -> msg.SamplingParams:
    return msg.SamplingParams(**kwargs)


def test_greedy_is_argmax_of_raw_logits():
    logits = _logits(3)
    tokens, logprobs = _sampler()(logits, _metadata([_params(temperature=0)] * 3))
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert logprobs is None


def test_logit_bias_moves_greedy_choice():
    logits = torch.zeros(1, V)
    logits[0, 5] = 3.0
    tokens, _ = _sampler()(logits, _metadata([_params(temperature=0, logit_bias={9: 4.0})]))
    assert tokens.tolist() == [9]
    tokens, _ = _sampler()(logits, _metadata([_params(temperature=0, logit_bias={9: 2.0})]))
    assert tokens.tolist() == [5]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos):
    logits = torch.zeros(1, V)
    logits[0, 0], logits[0, 7], logits[0, 2] = 5.0, 4.0, 3.0  # EOS, a stop id, a plain token
    params = _params(temperature=0, min_tokens=2, stop_token_ids=[7], ignore_eos=ignore_eos)
    early, _ = _sampler()(logits, _metadata([params], outputs=[[9]]))
    done, _ = _sampler()(logits, _metadata([params], outputs=[[9, 9]]))
    # stop ids are always masked; EOS unless ignore_eos (vLLM's rule)
    assert early.tolist() == ([0] if ignore_eos else [2])
    assert done.tolist() == [0]


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _logits(1)
    prompt, outputs = [1, 2, 3], [[4, 4, 9]]
    meta = _metadata([_params(temperature=0, repetition_penalty=1.7)], prompt, outputs)
    processed = logits.clone()
    Sampler.apply_processors(processed, meta)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(
        torch.tensor([prompt + outputs[0]]), logits.clone()
    )
    torch.testing.assert_close(processed, expected)


def test_presence_and_frequency_penalties_use_output_counts_only():
    logits = _logits(1)
    meta = _metadata(
        [_params(presence_penalty=0.5, frequency_penalty=0.25)], [1, 2], [[4, 4, 4, 9]]
    )
    processed = logits.clone()
    Sampler.apply_processors(processed, meta)
    delta = (logits - processed)[0]
    expected = torch.zeros(V)
    expected[4] = 0.5 + 3 * 0.25
    expected[9] = 0.5 + 0.25
    torch.testing.assert_close(delta, expected)  # prompt tokens 1, 2 untouched


def _histogram(params: msg.SamplingParams, logits_row: torch.Tensor, n: int = 4000) -> torch.Tensor:
    logits = logits_row.expand(n, V).clone()
    tokens, _ = _sampler(1)(logits, _metadata([params] * n))
    return torch.bincount(tokens, minlength=V).float() / n


def test_temperature_sampling_follows_the_softmax():
    logits = _logits(1)[0]
    for temperature in (0.5, 1.0, 2.0):
        freq = _histogram(_params(temperature=temperature), logits)
        expected = torch.softmax(logits / temperature, -1)
        assert (freq - expected).abs().sum() / 2 < 0.05, temperature


def test_top_k_keeps_only_the_k_best():
    logits = _logits(1)[0]
    freq = _histogram(_params(temperature=1.0, top_k=3), logits)
    allowed = set(logits.topk(3).indices.tolist())
    assert {i for i in range(V) if freq[i] > 0} == allowed
    expected = torch.zeros(V)
    expected[list(allowed)] = torch.softmax(logits[list(allowed)], -1)
    assert (freq - expected).abs().sum() / 2 < 0.05


def test_top_p_keeps_the_nucleus():
    logits = _logits(1)[0]
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.6).sum()) + 1].tolist())
    freq = _histogram(_params(temperature=1.0, top_p=0.6), logits)
    assert {i for i in range(V) if freq[i] > 0} == nucleus
    # with top-k too: the smaller of the two sets
    freq = _histogram(_params(temperature=1.0, top_p=0.6, top_k=1), logits)
    assert {i for i in range(V) if freq[i] > 0} == {int(order[0])}


def test_min_p_drops_unlikely_tokens():
    logits = _logits(1)[0]
    probs = torch.softmax(logits, -1)
    freq = _histogram(_params(temperature=1.0, min_p=0.3), logits)
    assert {i for i in range(V) if freq[i] > 0} == set(
        torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist()
    )


def test_mixed_batch_applies_each_rows_parameters():
    logits = _logits(4)
    params = [
        _params(temperature=0),
        _params(temperature=1.0, top_k=1),
        _params(temperature=0, logit_bias={3: 100.0}),
        _params(temperature=1.0),
    ]
    tokens, _ = _sampler()(logits, _metadata(params))
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax()
    assert tokens[2] == 3


def _seeded_run(seed: int, neighbours: list[msg.SamplingParams], steps: int = 20):
    logits_row = _logits(1, seed=5)
    params = [*neighbours, _params(temperature=1.0, seed=seed)]
    meta = _metadata(params)
    sampler = _sampler(seed=len(neighbours))  # the unseeded stream differs between runs
    out = []
    for _ in range(steps):
        logits = torch.cat([_logits(len(neighbours), seed=len(out)), logits_row])
        tokens, _ = sampler(logits, meta)
        out.append(int(tokens[-1]))
    return out


def test_seeded_sampling_ignores_batch_composition():
    alone = _seeded_run(42, [])
    crowded = _seeded_run(
        42, [_params(temperature=1.0), _params(temperature=0.7, seed=7), _params(temperature=0)]
    )
    assert alone == crowded
    assert _seeded_run(43, []) != alone


def test_logprobs_come_from_raw_logits():
    logits = _logits(2)
    params = [
        _params(temperature=0, logprobs=3, logit_bias={1: 50.0}, repetition_penalty=2.0),
        _params(temperature=0.0),
    ]
    tokens, logprobs = _sampler()(logits, _metadata(params))
    assert tokens[0] == 1
    raw = torch.log_softmax(logits[0], -1)
    assert logprobs.token_ids.tolist() == [1]  # only the row that asked
    torch.testing.assert_close(logprobs.logprobs[0], raw[1])
    assert int(logprobs.ranks[0]) == int((raw >= raw[1]).sum())
    torch.testing.assert_close(logprobs.top_logprobs[0], raw.topk(3).values)
    proto = logprobs.to_entries([3])[0]
    assert proto.token_id == 1 and list(proto.top_token_ids) == raw.topk(3).indices.tolist()
    assert list(logprobs.to_entries([0])[0].top_token_ids) == []


def _bitmask(rows: int, allowed: dict[int, list[int]]) -> torch.Tensor:
    """int32 [rows, ceil(V/32)] with only `allowed[row]` set (other rows all allowed)."""
    words = (V + 31) // 32
    mask = torch.full((rows, words), -1, dtype=torch.int32)
    for row, toks in allowed.items():
        bits = np.zeros(words * 32, dtype=np.uint8)
        bits[toks] = 1
        packed = np.packbits(bits.reshape(words, 32), axis=1, bitorder="little")
        mask[row] = torch.from_numpy(packed.copy().view(np.int32).reshape(words))
    return mask


def test_grammar_bitmask_limits_greedy_and_random_rows_only_where_given():
    logits = _logits(3, seed=4)
    allowed = {0: [2, 9], 2: [5]}
    meta = _metadata([_params(temperature=0), _params(temperature=0), _params(temperature=1.0)])
    meta.bitmask = _bitmask(3, allowed)
    meta.bitmask_rows = torch.tensor([0, 2])
    for seed in range(5):
        tokens, _ = _sampler(seed)(logits, meta)
        best0 = max(allowed[0], key=lambda t: logits[0, t])
        assert tokens[0] == best0  # greedy within the mask
        assert tokens[1] == logits[1].argmax()  # a row without a mask is untouched
        assert tokens[2] == 5  # the only token its mask allows


def test_grammar_bitmask_applies_after_logit_bias():
    """Bias cannot bring back a token the grammar forbids, and still ranks allowed ones."""
    logits = torch.zeros(1, V)
    params = _params(temperature=0, logit_bias={7: 100.0, 3: 5.0})
    meta = _metadata([params])
    meta.bitmask = _bitmask(1, {0: [3, 11]})
    meta.bitmask_rows = torch.tensor([0])
    tokens, _ = _sampler()(logits, meta)
    assert tokens.tolist() == [3]


def test_logprobs_stay_those_of_the_raw_logits_under_a_mask():
    logits = _logits(1, seed=2)
    meta = _metadata([_params(temperature=0, logprobs=2)])
    meta.bitmask = _bitmask(1, {0: [1]})
    meta.bitmask_rows = torch.tensor([0])
    tokens, lp = _sampler()(logits, meta)
    assert tokens.tolist() == [1]
    expected = torch.log_softmax(logits[0], -1)[1]
    assert torch.allclose(lp.logprobs[0], expected)


def _bad_words(*seqs: list[int]) -> list[list[int]]:
    return [list(s) for s in seqs]


def test_allowed_token_ids_limit_greedy_and_random_rows_only():
    logits = _logits(3, seed=4)
    allowed = [2, 11, 13]
    params = [
        _params(temperature=0, allowed_token_ids=allowed),
        _params(temperature=1.0, allowed_token_ids=allowed),
        _params(temperature=0),
    ]
    meta = _metadata(params)
    tokens, _ = _sampler()(logits, meta)
    assert tokens[0].item() == max(allowed, key=lambda t: logits[0, t].item())
    assert tokens[1].item() in allowed
    assert tokens[2].item() == logits[2].argmax().item()  # the unrestricted row is untouched
    for seed in range(20):  # the random row never leaves the set
        tok, _ = _sampler(seed)(_logits(3, seed=seed), _metadata(params))
        assert tok[1].item() in allowed


def test_allowed_token_ids_keep_raw_logprobs():
    logits = _logits(1, seed=2)
    meta = _metadata([_params(temperature=0, allowed_token_ids=[5], logprobs=3)])
    tokens, lps = _sampler()(logits, meta)
    assert tokens.tolist() == [5]
    expected = torch.log_softmax(logits, -1)[0, 5].item()
    assert lps.logprobs.tolist() == pytest.approx([expected], abs=1e-5)


def test_bad_words_ban_single_tokens_always_and_sequences_after_their_prefix():
    logits = torch.zeros(1, V)
    logits[0, 9], logits[0, 6], logits[0, 2] = 5.0, 4.0, 3.0
    # One-token bad word: 9 never; two-token [8, 6]: 6 only right after an 8 in the output.
    params = _params(temperature=0, bad_words_token_ids=_bad_words([9], [8, 6]))
    after_other, _ = _sampler()(logits, _metadata([params], outputs=[[8, 1]]))
    after_prefix, _ = _sampler()(logits, _metadata([params], outputs=[[1, 8]]))
    assert after_other.tolist() == [6]
    assert after_prefix.tolist() == [2]
    # The prompt does not count as output: a prompt ending with 8 does not ban 6 (vLLM's rule).
    at_start, _ = _sampler()(logits, _metadata([params], prompt=[3, 8], outputs=[[]]))
    assert at_start.tolist() == [6]


def test_bad_words_match_transformers_no_bad_words_processor():
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    logits = _logits(1, seed=5)
    prompt, out = [1, 2], [[7, 3, 4]]
    words = [[3, 4, 10], [4, 12], [14], [5, 5, 5]]
    meta = _metadata([_params(temperature=0, bad_words_token_ids=_bad_words(*words))], prompt, out)
    processed = logits.clone()
    Sampler.apply_processors(processed, meta)
    expected = NoBadWordsLogitsProcessor(words, eos_token_id=EOS)(
        torch.tensor([prompt + out[0]]), logits.clone()
    )
    assert torch.equal(torch.isinf(processed), torch.isinf(expected))
    assert torch.isinf(processed[0, [10, 12, 14]]).all()


def test_rows_release_their_allowed_and_bad_words_state():
    batch = InputBatch(64, 4, V, 8, torch.device("cpu"), initial_rows=1)
    sp = _params(temperature=0, allowed_token_ids=[1], bad_words_token_ids=_bad_words([2]))
    for rid in ("a", "b"):
        batch.add(msg.NewRequest(request_id=rid, token_ids=[3], sampling_params=sp))
    assert (batch.num_allowed, batch.num_bad_words) == (2, 2)
    batch.remove("a")
    batch.remove("b")
    assert (batch.num_allowed, batch.num_bad_words) == (0, 0)
    meta = batch.sampling_metadata(np.array([], dtype=np.int64), EOS)
    assert meta.allowed_rows is None and meta.masked_rows is None


@pytest.mark.parametrize(
    "params",
    [
        _params(allowed_token_ids=[V]),
        _params(bad_words_token_ids=_bad_words([1, -1])),
        _params(bad_words_token_ids=_bad_words([])),
    ],
)
def test_out_of_vocab_allowed_or_bad_word_ids_are_refused(params):
    batch = InputBatch(64, 4, V, 8, torch.device("cpu"), initial_rows=1)
    error = batch.add(msg.NewRequest(request_id="x", token_ids=[3], sampling_params=params))
    assert error and ("outside" in error or "empty" in error)
