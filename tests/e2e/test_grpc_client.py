"""The scheduler's public gRPC API as a client without splitserve sees it.

Stubs are generated from the shipped `.proto` files alone with the plain command the README
gives (`python -m grpc_tools.protoc -I protos ...`) into a temporary folder; a child process
whose sys.path holds that folder, but neither the repository nor the package's own stubs, runs
`examples/grpc_client.py`'s calls against `splitserve serve`: Tokenize, a streamed Generate,
Detokenize, and a long Generate cancelled mid-stream.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import splitserve.protos

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "grpc_client.py"
PROTOS = pathlib.Path(splitserve.protos.__file__).resolve().parent
PROMPT = "hello world, the quick brown fox"

# Runs in the child: the stubs come from PYTHONPATH, the example from its file.
DRIVER = r"""
import importlib.util, json, sys

import grpc

scheduler_address, tokenizer_address, example_path, repo = sys.argv[1:5]
assert repo not in sys.path and "" not in sys.path, sys.path
spec = importlib.util.spec_from_file_location("grpc_client", example_path)
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)
assert not any(m == "splitserve" or m.startswith("splitserve.") for m in sys.modules)
common_pb2, scheduler_pb2 = ex.common_pb2, ex.scheduler_pb2
result = {"stub_files": [ex.common_pb2.__file__, ex.scheduler_pb2.__file__]}

sch_channel = grpc.insecure_channel(scheduler_address)
tok_channel = grpc.insecure_channel(tokenizer_address)
scheduler = ex.scheduler_pb2_grpc.SchedulerServiceStub(sch_channel)
tokenizer = ex.tokenizer_pb2_grpc.TokenizerServiceStub(tok_channel)
info = scheduler.GetModelInfo(scheduler_pb2.GetModelInfoRequest(), timeout=10)
result["max_model_len"] = info.max_model_len
result["idle"] = ex.wait_idle(scheduler).num_free_blocks

prompt = ex.tokenize(tokenizer, sys.argv[5])
result["prompt"] = prompt
messages = list(
    ex.start_generate(scheduler, prompt, common_pb2.SamplingParams(temperature=0, max_tokens=8))
)
result["messages"] = [
    {"ids": list(m.token_ids), "finish": common_pb2.FinishReason.Name(m.finish_reason)}
    for m in messages
]
output = [t for m in messages for t in m.token_ids]
result["text"] = ex.detokenize(tokenizer, output)

# No max_tokens: the request runs to the context limit (common.proto says so).
near_full = (prompt * info.max_model_len)[: info.max_model_len - 12]
params = common_pb2.SamplingParams(temperature=0, ignore_eos=True)
tail = list(ex.start_generate(scheduler, near_full, params))
result["unset_max_tokens"] = {
    "tokens": sum(len(m.token_ids) for m in tail),
    "finish": common_pb2.FinishReason.Name(tail[-1].finish_reason),
}

# A long request, cancelled after three messages.
call = ex.start_generate(scheduler, prompt, params)
seen = []
for i, m in enumerate(call):
    seen.append(common_pb2.FinishReason.Name(m.finish_reason))
    if i == 2:
        steps_at_cancel = scheduler.GetStats(scheduler_pb2.GetStatsRequest()).num_steps
        call.cancel()
        break
result["cancelled_code"] = call.code().name
result["seen_before_cancel"] = seen
stats = ex.wait_idle(scheduler)
result["after_cancel"] = {
    "running": stats.num_running,
    "free": stats.num_free_blocks,
    "steps_since_cancel": stats.num_steps - steps_at_cancel,
}
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("stubs")
    protos = [str(PROTOS / f) for f in ("common.proto", "scheduler.proto", "tokenizer.proto")]
    cmd = [sys.executable, "-P", "-m", "grpc_tools.protoc", f"-I{PROTOS}"]
    cmd += [f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    assert run.returncode == 0, run.stderr
    return out


def test_stubs_from_the_shipped_protos_are_standalone(stubs):
    names = sorted(p.name for p in stubs.iterdir())
    assert names == sorted(
        f"{m}{s}" for m in ("common", "scheduler", "tokenizer") for s in ("_pb2.py", "_pb2_grpc.py")
    )
    # They import each other as top-level modules of the folder, never splitserve's stubs.
    text = (stubs / "scheduler_pb2.py").read_text()
    assert "import common_pb2" in text and "splitserve.protos" not in text


def test_example_client_generates_and_cancels(server, tiny_model, stubs, tmp_path):
    from transformers import AutoTokenizer

    driver = tmp_path / "drive.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(stubs)}
    run = subprocess.run(
        [sys.executable, "-P", str(driver), server.scheduler_address, server.tokenizer_address]
        + [str(EXAMPLE), str(REPO), PROMPT],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert all(pathlib.Path(f).parent == stubs for f in result["stub_files"])

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert result["prompt"] == tok(PROMPT)["input_ids"]

    messages = result["messages"]
    assert all(m["finish"] == "FINISH_REASON_UNSPECIFIED" for m in messages[:-1])
    output = [t for m in messages for t in m["ids"]]
    last = messages[-1]["finish"]
    assert last in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert len(output) == 8 if last == "FINISH_REASON_LENGTH" else 1 <= len(output) <= 8
    assert result["text"] == tok.decode(output, skip_special_tokens=True)

    assert result["unset_max_tokens"] == {"tokens": 12, "finish": "FINISH_REASON_LENGTH"}

    assert result["seen_before_cancel"] == ["FINISH_REASON_UNSPECIFIED"] * 3
    assert result["cancelled_code"] == "CANCELLED"
    after = result["after_cancel"]
    assert after["running"] == 0 and after["free"] == result["idle"]
    # Aborted, not run out: left alone it had hundreds of steps to go.
    remaining = result["max_model_len"] - len(result["prompt"]) - 3
    assert after["steps_since_cancel"] < remaining // 2, (after, remaining)
