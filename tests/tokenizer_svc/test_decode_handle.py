"""GetDecoder: the gateway's own detokenizer gives exactly the service's stream output."""

from __future__ import annotations

import random

import pytest

from splitserve.protos import tokenizer_pb2 as pb
from splitserve.tokenizer_svc.config import TokenizerServiceConfig
from splitserve.tokenizer_svc.decode_handle import DecodeHandle
from splitserve.tokenizer_svc.stream import SequenceStream

from .test_server import ServerThread, srv  # noqa: F401


def _run(handle, prompt, ids, stop, skip, include) -> list[tuple]:
    seq = SequenceStream(handle, prompt, skip, stop, include)
    out = []
    for k in range(0, len(ids), 3):
        d = seq.push(ids[k : k + 3])
        out.append((d.text, d.stopped, d.stop_reason))
    d = seq.finish()
    out.append((d.text, d.stopped, d.stop_reason, d.flushed))
    return out


def test_decoder_spec_rebuilds_the_same_detokenizer(srv, handle):  # noqa: F811
    spec = srv.stub.GetDecoder(pb.GetDecoderRequest(), timeout=10)
    assert spec.tokenizer_json and spec.vocab_size == handle.vocab_size
    assert set(spec.skip_special_ids) == handle.skip_ids and spec.skip_special_ids
    assert spec.max_stop_strings == 4
    local = DecodeHandle(spec.tokenizer_json, spec.skip_special_ids, spec.vocab_size)
    rng = random.Random(0)
    text = "Beautiful is better than ugly. Explicit — naïve café 😀 is better than implicit."
    words = handle.encode(text, add_special_tokens=False)
    specials = sorted(handle.skip_ids)
    for trial in range(40):
        ids = [rng.choice(words) for _ in range(rng.randint(1, 30))]
        ids += [rng.randrange(0, handle.vocab_size + 5) for _ in range(rng.randint(0, 6))]
        ids.insert(rng.randrange(len(ids)), rng.choice(specials))
        prompt = [rng.choice(words) for _ in range(rng.randint(0, 8))]
        stop = [handle.decode(ids[3:5], False)] if trial % 3 == 0 else []
        stop = [s for s in stop if s]
        skip, include = trial % 2 == 0, trial % 4 == 1
        assert _run(local, prompt, ids, stop, skip, include) == _run(
            handle, prompt, ids, stop, skip, include
        )


def test_a_python_tokenizer_is_not_shipped(byt5_dir):
    s = ServerThread(TokenizerServiceConfig(tokenizer=str(byt5_dir)))
    try:
        spec = s.stub.GetDecoder(pb.GetDecoderRequest(), timeout=10)
        assert spec.tokenizer_json == "" and spec.vocab_size > 0
    finally:
        s.close()


@pytest.mark.parametrize("token_id", [0, 5])
def test_ids_past_the_vocabulary_decode_to_nothing(srv, token_id):  # noqa: F811
    spec = srv.stub.GetDecoder(pb.GetDecoderRequest(), timeout=10)
    local = DecodeHandle(spec.tokenizer_json, spec.skip_special_ids, spec.vocab_size)
    assert local.id_to_token(spec.vocab_size + token_id) == ""
