"""A constrained request whose grammar compile is not done is deferred on the real worker
process, and only it: an unconstrained request beside it decodes to the end meanwhile.

The worker's background xgrammar compile is held by the test hook
SPLITSERVE_TEST_GRAMMAR_COMPILE_GATE (worker/structured_output.py): it waits until a file
exists, and the test creates that file only after the unconstrained request has finished.
Were the compile run inside a step, or the first mask awaited, that step would block on the
gate and the unconstrained request could never finish first (its client times out).
"""

from __future__ import annotations

import re
import threading

import openai
import pytest

from splitserve.worker.structured_output import TEST_COMPILE_GATE_ENV

from .conftest import Server, wait_for

REGEX = r"(yes|no)-[0-9]{2}"
PLAIN_TOKENS = 16


@pytest.fixture(scope="module")
def gated(tiny_model, tmp_path_factory):
    gate = tmp_path_factory.mktemp("compile_gate") / "release"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TEST_COMPILE_GATE_ENV, str(gate))
        server = Server(tiny_model, [], tmp_path_factory.mktemp("deferral_logs") / "serve.log")
    yield server, gate
    server.stop()


def test_a_held_compile_defers_only_its_request_across_processes(gated):
    server, gate = gated
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    chunks: list[str] = []
    first_token = threading.Event()
    failure: list[BaseException] = []

    def constrained() -> None:
        try:
            stream = client.completions.create(
                model=server.model,
                prompt="The answer is",
                max_tokens=24,
                temperature=0,
                stream=True,
                extra_body={"guided_decoding_backend": "xgrammar", "guided_regex": REGEX},
                timeout=180,
            )
            for ch in stream:
                for c in ch.choices:
                    if c.text:
                        chunks.append(c.text)
                        first_token.set()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            failure.append(exc)

    worker = threading.Thread(target=constrained, daemon=True)
    worker.start()
    # The constrained request is scheduled (so its prompt is on the worker, compiling).
    wait_for(lambda: server.scheduler_stats().num_running == 1, 60, "the constrained request")
    plain = client.completions.create(
        model=server.model,
        prompt="Errors should never",
        max_tokens=PLAIN_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert plain.usage.completion_tokens == PLAIN_TOKENS
    # It decoded to the end while the constrained one, still running, had no token.
    assert not first_token.is_set() and not chunks
    assert server.scheduler_stats().num_running == 1
    gate.touch()  # release the compile
    worker.join(180)
    assert not worker.is_alive() and not failure, failure
    text = "".join(chunks)
    assert re.fullmatch(REGEX, text), text
    stats = server.scheduler_stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
