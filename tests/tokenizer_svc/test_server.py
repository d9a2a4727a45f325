"""The gRPC service end to end: real server on a loopback port, generated stubs as client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.protos import tokenizer_pb2 as pb
from splitserve.protos import tokenizer_pb2_grpc
from splitserve.tokenizer_svc.config import TokenizerServiceConfig
from splitserve.tokenizer_svc.server import SERVICE_NAME, TokenizerServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServerThread:
    """A TokenizerServer on its own event loop in a background thread."""

    def __init__(self, config: TokenizerServiceConfig, load: bool = True):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = TokenizerServer(config)
        self.port = self.call(self.server.start("127.0.0.1:0"))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = tokenizer_pb2_grpc.TokenizerServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        if load:
            self.load()

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def load(self) -> None:
        self.call(self.server.load())

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def close(self) -> None:
        self.channel.close()
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def srv(chatml_dir):
    s = ServerThread(TokenizerServiceConfig(tokenizer=str(chatml_dir), max_stop_strings=4))
    yield s
    s.close()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def stream(srv, requests):
    return list(srv.stub.DetokenizeStream(iter(requests), timeout=10))


def start_msg(**kwargs):
    return pb.DetokenizeStreamRequest(start=pb.DetokenizeStart(**kwargs))


def tokens_msg(ids):
    return pb.DetokenizeStreamRequest(tokens=pb.TokenIds(token_ids=ids))


def test_tokenize_detokenize_info(srv, handle):
    ids = srv.stub.Tokenize(
        pb.TokenizeRequest(text="héllo 你好 🙂", add_special_tokens=False), timeout=5
    ).token_ids
    assert list(ids) == handle.tokenizer.encode("héllo 你好 🙂", add_special_tokens=False)
    text = srv.stub.Detokenize(pb.DetokenizeRequest(token_ids=ids), timeout=5).text
    assert text == "héllo 你好 🙂"
    info = srv.stub.GetTokenizerInfo(pb.GetTokenizerInfoRequest(), timeout=5)
    assert (info.vocab_size, info.eos_token_id, info.bos_token_id) == (1000, 1, 0)
    assert info.has_chat_template and info.name == handle.name
    # No token stands for more characters than max_token_chars: a text of c characters takes
    # at least c / max_token_chars tokens (the gateway's size check before tokenizing).
    pieces = [handle.tokenizer.convert_ids_to_tokens(i) for i in range(info.vocab_size)]
    assert info.max_token_chars == max(
        max(len(p) for p in pieces),
        max(len(handle.tokenizer.decode([i])) for i in range(info.vocab_size)),
    )
    text = "the quick brown fox jumps over the lazy dog, " * 20 + "     " * 30
    assert len(handle.encode(text, False)) * info.max_token_chars >= len(text)


def test_decode_each(srv, handle):
    ids = handle.encode("é ok", add_special_tokens=False) + [handle.info().eos_token_id]
    out = srv.stub.DecodeEach(pb.DecodeEachRequest(token_ids=ids), timeout=5)
    assert list(out.tokens) == [handle.tokenizer.decode([i]) for i in ids]
    assert b"".join(out.token_bytes) == "é ok</s>".encode()
    many = ids * 200  # past the inline limit: decoded in the thread pool, same answer
    out = srv.stub.DecodeEach(pb.DecodeEachRequest(token_ids=many), timeout=5)
    assert len(out.tokens) == len(many) and list(out.tokens[: len(ids)]) == list(
        srv.stub.DecodeEach(pb.DecodeEachRequest(token_ids=ids), timeout=5).tokens
    )


def test_prepare_chat_template(srv, handle):
    req = pb.ChatInput(
        messages_json=json.dumps([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
        add_generation_prompt=True,
    )
    (out,) = srv.stub.Prepare(pb.PrepareRequest(chat=req), timeout=5).prompts
    assert out.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert list(out.token_ids) == handle.tokenizer.encode(out.text, add_special_tokens=False)


def test_detokenize_stream_one_response_per_message(srv, handle):
    tok = handle.tokenizer
    prompt = tok.encode("Say:", add_special_tokens=False)
    ids = tok.encode(" héllo 🚀 wörld", add_special_tokens=False)
    requests = [start_msg(request_id="r1", prompt_token_ids=prompt, skip_special_tokens=True)]
    requests += [tokens_msg([i]) for i in ids] + [tokens_msg([tok.eos_token_id]), tokens_msg([])]
    responses = stream(srv, requests)
    assert len(responses) == len(requests)
    assert responses[0] == pb.DetokenizeStreamResponse()
    assert all("\ufffd" not in r.text for r in responses)
    assert "".join(r.text for r in responses) == " héllo 🚀 wörld"
    assert responses[-1].flushed and not any(r.flushed for r in responses[:-1])
    assert not any(r.stopped for r in responses)


def test_detokenize_stream_stop_and_flush(srv, handle):
    tok = handle.tokenizer
    ids = tok.encode("The answer is 42.\n\nUser: more", add_special_tokens=False)
    requests = [start_msg(request_id="r2", stop=["User:", "\n\n"])]
    requests += [tokens_msg(ids[i : i + 2]) for i in range(0, len(ids), 2)] + [tokens_msg([])]
    responses = stream(srv, requests)
    assert len(responses) == len(requests)
    first_stop = next(i for i, r in enumerate(responses) if r.stopped)
    assert responses[first_stop].stop_reason == "\n\n"
    assert "".join(r.text for r in responses) == "The answer is 42."
    assert all(r.stopped and r.text == "" for r in responses[first_stop + 1 :])
    assert responses[-1].flushed

    # Without a stop: the held-back prefix of a stop string comes out with the flush.
    ids = tok.encode("half a Use", add_special_tokens=False)
    responses = stream(srv, [start_msg(stop=["User:"]), tokens_msg(ids), tokens_msg([])])
    assert responses[1].text == "half a " and responses[2].text == "Use"
    assert responses[2].flushed and not responses[2].stopped


@pytest.mark.parametrize(
    "requests, match",
    [
        ([tokens_msg([1])], "first DetokenizeStream message must carry `start`"),
        ([start_msg(), start_msg()], "`start` sent twice"),
        ([start_msg(), pb.DetokenizeStreamRequest()], "must carry `start` or `tokens`"),
        ([start_msg(), tokens_msg([3, -2])], "token id -2 is negative"),
        ([start_msg(prompt_token_ids=[-5])], "prompt token id -5 is negative"),
        ([start_msg(stop=["a", "b", "c", "d", "e"])], "at most 4"),
        ([start_msg(stop=["a", ""])], "must not be empty"),
        ([start_msg(), tokens_msg([]), tokens_msg([5])], "after the end-of-sequence flush"),
    ],
)
def test_detokenize_stream_invalid(srv, requests, match):
    code, details = code_of(lambda: stream(srv, requests))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert match in details


def chat_prepare(**chat) -> pb.PrepareRequest:
    return pb.PrepareRequest(chat=pb.ChatInput(**chat))


@pytest.mark.parametrize(
    "rpc, request_, match",
    [
        ("Detokenize", pb.DetokenizeRequest(token_ids=[5, 1000]), "token id 1000 is outside"),
        ("Detokenize", pb.DetokenizeRequest(token_ids=[-1]), "token id -1 is outside"),
        ("DecodeEach", pb.DecodeEachRequest(token_ids=[-1]), "token id -1 is negative"),
        ("Prepare", chat_prepare(messages_json="{oops"), "not valid JSON"),
        (
            "Prepare",
            chat_prepare(messages_json='[{"role": "x"}]'),
            "role must be one of",
        ),
        (
            "Prepare",
            chat_prepare(
                messages_json='[{"role": "user", "content": "hi"}]', chat_template="{{ 'x' }}"
            ),
            "does not trust request chat templates",
        ),
        (
            "Prepare",
            chat_prepare(messages_json='[{"role": "user", "content": "\\udfff"}]'),
            "lone surrogate",
        ),
    ],
)
def test_invalid_argument_and_still_healthy(srv, rpc, request_, match):
    code, details = code_of(lambda: getattr(srv.stub, rpc)(request_, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and match in details
    assert srv.health_status() == SERVING
    assert srv.stub.Tokenize(pb.TokenizeRequest(text="ok"), timeout=5).token_ids


def test_prepare_prompts_bad_words_truncation_and_text(srv, handle):
    tok = handle.tokenizer
    ids = tok.encode("a b c d", add_special_tokens=False)
    prompts = pb.PromptList(
        prompts=[
            pb.PromptInput(text="hello world"),
            pb.PromptInput(token_ids=pb.TokenIds(token_ids=ids)),
        ],
        add_special_tokens=True,
    )
    out = srv.stub.Prepare(
        pb.PrepareRequest(prompts=prompts, bad_words=["world", " world", "cat"]), timeout=5
    )
    text, given = out.prompts
    assert list(text.token_ids) == handle.encode("hello world", True) and text.text == "hello world"
    assert list(given.token_ids) == ids and not given.HasField("text")
    expected = []
    for word in ("world", "world", "cat"):  # each word as is and after a space, deduplicated
        for variant in (word, " " + word):
            seq = tok.encode(variant, add_special_tokens=False)
            if seq not in expected:
                expected.append(seq)
    assert [list(s.token_ids) for s in out.bad_words_token_ids] == expected

    # Truncation keeps the last k ids; the text is then decoded from them when asked for.
    out = srv.stub.Prepare(
        pb.PrepareRequest(prompts=prompts, truncate_prompt_tokens=2, return_prompt_text=True),
        timeout=5,
    )
    for p, full in zip(out.prompts, (handle.encode("hello world", True), ids), strict=True):
        assert list(p.token_ids) == full[-2:]
        assert p.text == tok.decode(full[-2:], skip_special_tokens=False)


def test_nul_in_text(srv):
    ids = srv.stub.Tokenize(pb.TokenizeRequest(text="a\x00b"), timeout=5).token_ids
    assert srv.stub.Detokenize(pb.DetokenizeRequest(token_ids=ids), timeout=5).text == "a\x00b"


def test_health_and_lifecycle(chatml_dir, caplog):
    config = TokenizerServiceConfig(
        tokenizer=str(chatml_dir), trust_request_chat_template=True, chat_template_timeout_s=1.0
    )
    s = ServerThread(config, load=False)
    try:
        assert s.health_status() == NOT_SERVING
        assert s.health_status(SERVICE_NAME) == NOT_SERVING
        code, details = code_of(lambda: s.stub.Tokenize(pb.TokenizeRequest(text="x"), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details
        s.load()
        assert s.health_status() == SERVING and s.health_status(SERVICE_NAME) == SERVING

        # A trusted request template renders; an endless one is cut off, and the event loop
        # answers other calls while that render runs in a worker thread.
        ok = chat_prepare(
            messages_json='[{"role": "user", "content": "hi"}]',
            chat_template="{{ messages[0].content }}!",
        )
        assert s.stub.Prepare(ok, timeout=5).prompts[0].text == "hi!"
        endless = chat_prepare(
            messages_json='[{"role": "user", "content": "hi"}]',
            chat_template="{% for i in range(100000) %}{% for j in range(100000) %}x"
            "{% endfor %}{% endfor %}",
        )
        renderer = s.server.servicer._renderer
        rendering = threading.Event()
        render = renderer.render

        def observed_render(request):
            rendering.set()
            return render(request)

        renderer.render = observed_render
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(s.stub.Prepare, endless, timeout=30)
            assert rendering.wait(10)
            s.stub.GetTokenizerInfo(pb.GetTokenizerInfoRequest(), timeout=5)
            assert not pending.done()  # answered while the render still runs
            code, details = code_of(pending.result)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "chat template rendering exceeded 1 s" in details

        # An unexpected exception becomes INTERNAL with the traceback logged.
        def boom(text, add_special_tokens):
            raise RuntimeError("injected fault")

        s.server.servicer._handle.encode = boom
        code, details = code_of(lambda: s.stub.Tokenize(pb.TokenizeRequest(text="x"), timeout=5))
        assert code == grpc.StatusCode.INTERNAL and "injected fault" in details
        assert any(r.exc_info and "injected fault" in str(r.exc_info[1]) for r in caplog.records)
        assert s.health_status() == SERVING
    finally:
        s.close()


def test_port_in_use_is_an_error(srv, chatml_dir):
    server = TokenizerServer(TokenizerServiceConfig(tokenizer=str(chatml_dir)))
    with pytest.raises(OSError, match="could not bind"):
        srv.call(server.start(f"127.0.0.1:{srv.port}"))
    srv.call(server.stop(0))


_SERVE = """
import asyncio, logging, sys
sys.modules["torch"] = None  # the service must run without torch
logging.basicConfig(level=logging.INFO)
from splitserve.tokenizer_svc.config import TokenizerServiceConfig
from splitserve.tokenizer_svc.server import run_tokenizer_service
asyncio.run(run_tokenizer_service(TokenizerServiceConfig(tokenizer=sys.argv[1]), sys.argv[2]))
"""


def test_process_serves_on_unix_socket_and_stops_on_sigterm(chatml_dir, tmp_path):
    sock = tmp_path / "tok.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, str(chatml_dir), f"unix:{sock}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            status = None
            while status != SERVING:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "service never became SERVING"
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    time.sleep(0.05)
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            assert (
                stub.Detokenize(
                    pb.DetokenizeRequest(
                        token_ids=stub.Tokenize(
                            pb.TokenizeRequest(text="hi 🚀"), timeout=5
                        ).token_ids
                    ),
                    timeout=5,
                ).text
                == "hi 🚀"
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stdout.read()
        assert "tokenizer service stopping" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_process_exits_non_zero_when_the_tokenizer_cannot_load(tmp_path):
    missing = tmp_path / "missing"
    proc = subprocess.run(
        [sys.executable, "-c", _SERVE, str(missing), f"unix:{tmp_path / 's.sock'}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr
