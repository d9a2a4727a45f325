"""Call the scheduler directly over gRPC: tokenize, Generate (streamed), detokenize, cancel.

Generate the stubs from the shipped `.proto` files first (README, "Calling the scheduler
directly"), then put their folder on the path:

    python -m grpc_tools.protoc -I protos --python_out=stubs --grpc_python_out=stubs \\
        protos/common.proto protos/scheduler.proto protos/tokenizer.proto
    PYTHONPATH=stubs python examples/grpc_client.py \\
        --scheduler 127.0.0.1:50052 --tokenizer 127.0.0.1:50051 --prompt "Hello"

(`splitserve serve MODEL --scheduler-address 127.0.0.1:50052 --tokenizer-address
127.0.0.1:50051` pins the two addresses.) The scheduler takes and returns token ids only: text
goes through the tokenizer service, and stop strings are the caller's business.
"""

from __future__ import annotations

import argparse
import time
import uuid

import common_pb2
import grpc
import scheduler_pb2
import scheduler_pb2_grpc
import tokenizer_pb2
import tokenizer_pb2_grpc


def tokenize(tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub, text: str) -> list[int]:
    """The prompt's token ids, with the tokenizer's special tokens (BOS) as it adds them."""
    resp = tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text=text, add_special_tokens=True))
    return list(resp.token_ids)


def detokenize(tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub, token_ids: list[int]) -> str:
    resp = tokenizer.Detokenize(
        tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=True)
    )
    return resp.text


def start_generate(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    prompt_token_ids: list[int],
    params: common_pb2.SamplingParams,
    timeout: float = 120.0,
):
    """Queue a request; iterate the returned call for the scheduler's messages (new token ids
    each step, the finish reason on the last one). `call.cancel()` aborts the request and
    frees its KV blocks."""
    request = scheduler_pb2.GenerateRequest(
        request_id=f"example-{uuid.uuid4().hex}",
        prompt_token_ids=prompt_token_ids,
        sampling_params=params,
    )
    return scheduler.Generate(request, timeout=timeout)


def wait_idle(scheduler: scheduler_pb2_grpc.SchedulerServiceStub, timeout: float = 30.0):
    """The scheduler's stats once nothing waits or runs; TimeoutError past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        stats = scheduler.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"the scheduler is still busy: {stats}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheduler", default="127.0.0.1:50052", help="scheduler address")
    parser.add_argument("--tokenizer", default="127.0.0.1:50051", help="tokenizer address")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    with (
        grpc.insecure_channel(args.scheduler) as sch_channel,
        grpc.insecure_channel(args.tokenizer) as tok_channel,
    ):
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(sch_channel)
        tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(tok_channel)
        info = scheduler.GetModelInfo(scheduler_pb2.GetModelInfoRequest(), timeout=10)
        print(f"model {info.model}, context {info.max_model_len} tokens")

        prompt_ids = tokenize(tokenizer, args.prompt)
        print(f"prompt: {len(prompt_ids)} tokens {prompt_ids}")
        # Greedy. The model's generation_config defaults are not applied here (the gateway
        # applies them); an unset field takes the server's built-in default.
        params = common_pb2.SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        output: list[int] = []
        for resp in start_generate(scheduler, prompt_ids, params):
            output.extend(resp.token_ids)
            print("tokens", list(resp.token_ids), flush=True)
            if resp.finish_reason:
                print("finished:", common_pb2.FinishReason.Name(resp.finish_reason))
        print("text:", repr(detokenize(tokenizer, output)))

        # A long request (no max_tokens: up to the context limit), cancelled after 3 messages.
        long_params = common_pb2.SamplingParams(temperature=0.0, ignore_eos=True)
        call = start_generate(scheduler, prompt_ids, long_params)
        for i, _ in enumerate(call):
            if i == 2:
                call.cancel()
                break
        stats = wait_idle(scheduler)
        print(
            f"cancelled; scheduler idle: {stats.num_running} running, "
            f"{stats.num_free_blocks}/{stats.num_total_blocks} KV blocks free"
        )


if __name__ == "__main__":
    main()
