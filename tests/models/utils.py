"""Helpers of the model tests: the transformers oracle, the logprobs rule, and a step driver.

`StepDriver` is a deliberately naive scheduler: blocks come from a counter, prompts go in whole
(or in fixed-size chunks), then one decode token per step, until max_tokens. It drives a
`ModelRunner` with the same `StepRequest` protos the real scheduler sends, and never passes
sampled tokens back (the worker keeps them), as under async scheduling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from splitserve.common import messages as msg

TokensLogprobs = tuple[list[int], list[dict[int, float]]]
"""(token ids, per position {token id: logprob} of the top-k)."""


# --------------------------------------------------------------------------- the oracle


def hf_model(path, dtype=torch.float32, **kwargs):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.generation_config.eos_token_id = None  # generate the full length, like the driver
    return model.eval()


@torch.inference_mode()
def hf_greedy_logprobs(
    model, prompts: Sequence[Sequence[int]], max_tokens: int, num_logprobs: int
) -> list[TokensLogprobs]:
    """transformers greedy decoding, one prompt at a time (no padding), with raw top-k logprobs."""
    results = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([list(prompt)]),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        tokens = out.sequences[0, len(prompt) :].tolist()
        tops = []
        for logits in out.logits:
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            values, ids = lp.topk(num_logprobs)
            tops.append(dict(zip(ids.tolist(), values.tolist(), strict=True)))
        results.append((tokens, tops))
    return results


@torch.inference_mode()
def hf_prompt_logprobs(model, prompt: Sequence[int]) -> torch.Tensor:
    """[len(prompt) - 1] logprob of prompt[i + 1] given prompt[: i + 1]."""
    logits = model(torch.tensor([list(prompt)])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]


def check_logprobs_close(
    outputs_0: Sequence[TokensLogprobs],
    outputs_1: Sequence[TokensLogprobs],
    name_0: str,
    name_1: str,
    atol: float = 1e-3,
) -> None:
    """The parity rule: while tokens match, their logprobs agree within atol; at the first
    divergence each side's token must be in the other's top-k, and the comparison stops."""
    assert len(outputs_0) == len(outputs_1)
    for i, ((tokens_0, lps_0), (tokens_1, lps_1)) in enumerate(
        zip(outputs_0, outputs_1, strict=True)
    ):
        for pos, (t0, t1) in enumerate(zip(tokens_0, tokens_1, strict=False)):
            top_0, top_1 = lps_0[pos], lps_1[pos]
            if t0 == t1:
                for tok in set(top_0) & set(top_1):
                    assert abs(top_0[tok] - top_1[tok]) <= atol, (
                        f"prompt {i} position {pos} token {tok}: {name_0} logprob "
                        f"{top_0[tok]:.6f} vs {name_1} {top_1[tok]:.6f}"
                    )
                continue
            assert t0 in top_1, (
                f"prompt {i} position {pos}: {name_0} token {t0} is not in {name_1}'s top-k {top_1}"
            )
            assert t1 in top_0, (
                f"prompt {i} position {pos}: {name_1} token {t1} is not in {name_0}'s top-k {top_0}"
            )
            break


# --------------------------------------------------------------------------- the driver


@dataclass
class DriverRequest:
    request_id: str
    token_ids: list[int]
    params: msg.SamplingParams
    max_tokens: int
    num_prompt: int
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    sent: bool = False
    new_blocks: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    logprobs: list[msg.TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[msg.TokenLogprobs] = field(default_factory=list)
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or len(self.outputs) >= self.max_tokens

    def top_logprobs(self) -> TokensLogprobs:
        tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in self.logprobs]
        return list(self.outputs), tops


class StepDriver:
    """Feeds a ModelRunner StepRequests for a set of requests until they all finish."""

    def __init__(
        self,
        runner,
        block_size: int = 16,
        num_blocks: int = 512,
        chunk_size: int | None = None,
        initialize: bool = True,
    ) -> None:
        self.runner = runner
        self.block_size = block_size
        self.chunk_size = chunk_size
        if initialize:
            runner.initialize_cache(num_blocks, block_size)
        self.next_block = 0
        self.step_id = 0
        self.requests: dict[str, DriverRequest] = {}
        self.finished: list[str] = []

    def add(
        self,
        request_id: str,
        prompt: Sequence[int],
        max_tokens: int = 8,
        params: msg.SamplingParams | None = None,
        shared_prefix_from: str | None = None,
        num_shared_blocks: int = 0,
    ) -> DriverRequest:
        """Queue a request; with shared_prefix_from, reuse that request's first blocks as a
        prefix-cache hit (num_computed_tokens > 0)."""
        params = params if params is not None else msg.SamplingParams(temperature=0)
        req = DriverRequest(request_id, list(prompt), params, max_tokens, len(prompt))
        if shared_prefix_from is not None:
            source = self.requests[shared_prefix_from]
            assert source.num_computed >= num_shared_blocks * self.block_size
            req.block_ids = source.block_ids[:num_shared_blocks]
            req.num_computed = num_shared_blocks * self.block_size
        self.requests[request_id] = req
        return req

    def _alloc(self, req: DriverRequest, upto: int) -> None:
        need = math.ceil(upto / self.block_size) - len(req.block_ids)
        new = list(range(self.next_block, self.next_block + max(need, 0)))
        self.next_block += len(new)
        req.block_ids += new
        req.new_blocks += new

    def build_step(self) -> msg.StepRequest:
        step = msg.StepRequest(step_id=self.step_id, finished_request_ids=self.finished)
        self.finished = []
        for req in self.requests.values():
            if req.done:
                continue
            known = req.num_prompt + len(req.outputs)
            n = known - req.num_computed
            if self.chunk_size is not None:
                n = min(n, self.chunk_size)
            self._alloc(req, req.num_computed + n)
            if not req.sent:
                step.new_requests.append(
                    msg.NewRequest(
                        request_id=req.request_id,
                        token_ids=list(req.token_ids),
                        sampling_params=req.params,
                        block_ids=list(req.block_ids),
                        num_computed_tokens=req.num_computed,
                        num_prompt_tokens=req.num_prompt,
                    )
                )
                req.sent = True
            else:
                step.cached_requests.append(
                    msg.CachedRequest(
                        request_id=req.request_id,
                        new_block_ids=req.new_blocks,
                        num_computed_tokens=req.num_computed,
                    )
                )
            req.new_blocks = []
            step.num_scheduled_tokens[req.request_id] = n
            req.num_computed += n
        self.step_id += 1
        return step

    def step(self) -> msg.StepResult:
        result = self.runner.execute(self.build_step())
        # No entries when no request asked; None for one that did not.
        lps = result.logprobs or [None] * len(result.request_ids)
        for rid, tok, lp in zip(result.request_ids, result.token_ids, lps, strict=True):
            req = self.requests[rid]
            req.outputs.append(tok)
            req.token_ids.append(tok)
            req.logprobs.append(lp if lp is not None else msg.TokenLogprobs())
            if req.done:
                self.finished.append(rid)
        for rid, entries in result.prompt_logprobs.items():
            self.requests[rid].prompt_logprobs.extend(entries)
        for rid, message in result.errors.items():
            if rid in self.requests:
                self.requests[rid].error = message
                self.finished.append(rid)
        return result

    def run(self, max_steps: int = 1000) -> dict[str, DriverRequest]:
        for _ in range(max_steps):
            if all(r.done for r in self.requests.values()):
                break
            self.step()
        return self.requests
