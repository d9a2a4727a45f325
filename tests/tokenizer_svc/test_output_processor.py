"""The output processor the gateway and the in-process LLM share."""

from __future__ import annotations

from splitserve.protos import common_pb2
from splitserve.tokenizer_svc.output_processor import OutputProcessor
from splitserve.tokenizer_svc.stream import SequenceStream

F = common_pb2.FinishReason


def _lp(token_id: int) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(token_id=token_id, logprob=-0.5)


def _proc(handle, stop=(), **kw) -> OutputProcessor:
    stream = SequenceStream(handle, [], True, list(stop))
    return OutputProcessor(stream, 3, has_stop_strings=bool(stop), want_logprobs=True, **kw)


def test_stop_token_counted_not_detokenized_and_stop_reason(handle):
    word = handle.encode(" better", add_special_tokens=False)
    stop_id = handle.encode(" ugly", add_special_tokens=False)[0]
    eos = frozenset({handle.tokenizer.convert_tokens_to_ids("<|im_end|>")})
    p = _proc(handle, stop_token_ids=frozenset({stop_id}), eos=eos)
    d = p.process([*word, stop_id], [], (), F.FINISH_REASON_STOP, stop_id)
    assert d.text == " better" and d.token_ids == [*word, stop_id]
    assert d.finish_reason == "stop" and d.stop_reason == stop_id and p.done
    (eos_id,) = eos
    p = _proc(handle, eos=eos)
    d = p.process([*word, eos_id], [], (), F.FINISH_REASON_STOP, eos_id)
    assert d.text == " better" and d.stop_reason is None  # EOS is no stop_reason (vLLM)


def test_stop_string_cuts_tokens_at_the_one_that_completed_it(handle):
    ids = handle.encode(" is better than ugly.", add_special_tokens=False)
    p = _proc(handle, stop=["better"])
    d = p.process(ids, [_lp(t) for t in ids], (), F.FINISH_REASON_UNSPECIFIED, None)
    upto = next(k for k in range(1, len(ids) + 1) if "better" in handle.decode(ids[:k], True))
    assert d.text == " is " and d.token_ids == ids[:upto] and len(d.logprobs) == upto
    assert d.finish_reason == "stop" and d.stop_reason == "better"
    assert p.stopped_by_string and p.done


def test_prompt_logprobs_gathered_over_chunks_and_given_once(handle):
    stream = SequenceStream(handle, [], True)
    p = OutputProcessor(stream, 3, want_prompt_logprobs=True)
    assert p.process([], [], [_lp(1)], F.FINISH_REASON_UNSPECIFIED, None) is None
    d = p.process([5], [], [_lp(2)], F.FINISH_REASON_UNSPECIFIED, None)
    assert [e.token_id for e in d.prompt_logprobs] == [1, 2] and d.logprobs == []
    d = p.process([6], [], (), F.FINISH_REASON_LENGTH, None)
    assert d.prompt_logprobs is None and d.finish_reason == "length"


def test_without_a_stream_no_text_and_no_stop_strings():
    p = OutputProcessor(None, 2, has_stop_strings=True)
    assert p.process([7, 8], [], (), F.FINISH_REASON_UNSPECIFIED, None).text == ""
    d = p.process([9], [], (), F.FINISH_REASON_LENGTH, None)
    assert d.token_ids == [9] and d.finish_reason == "length" and d.text == ""


def test_the_gateway_and_the_llm_run_this_processor():
    import inspect

    from splitserve.gateway import output_stream
    from splitserve.offline import llm

    assert "OutputProcessor(" in inspect.getsource(llm.LLM._run)
    assert "OutputProcessor(" in inspect.getsource(output_stream.SequenceOutput.__init__)
