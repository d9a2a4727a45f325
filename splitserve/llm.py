"""`LLM`: the scheduler and the worker in one process, no gRPC (vLLM's offline API).

    from splitserve import LLM, SamplingParams
    llm = LLM("path/to/model")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))

Tests use it, and it is the baseline of the split-overhead benchmark.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.generation_config import SamplingDefaults
from splitserve.lora import LoRARequest
from splitserve.protos import common_pb2, scheduler_pb2
from splitserve.sampling_params import SamplingParams, bad_word_variants

_FINISH = {
    common_pb2.FinishReason.FINISH_REASON_STOP: "stop",
    common_pb2.FinishReason.FINISH_REASON_LENGTH: "length",
    common_pb2.FinishReason.FINISH_REASON_ABORT: "abort",
    common_pb2.FinishReason.FINISH_REASON_ERROR: "error",
}


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """Everything generated for one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[common_pb2.TokenLogprobs] | None = None
    num_cached_tokens: int = 0
    finished: bool = True


@dataclass
class _Seq:
    index: int
    prompt_idx: int
    stream: object | None
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


class LLM:
    """An in-process engine over a local model folder or hub id.

    Keyword arguments are the fields of `WorkerConfig` and `SchedulerConfig` (the same names
    as the `splitserve serve` flags), plus `tokenizer` and `tokenizer_mode`. As in vLLM,
    `generation_config` ("auto", "vllm" or a folder) and `override_generation_config` (a dict
    or JSON text) set the default sampling parameters: `get_default_sampling_params()`, which
    `generate` and `chat` use when given none.
    """

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs) -> None:
        from splitserve.inproc_executor import InprocExecutor
        from splitserve.scheduler.config import SchedulerConfig
        from splitserve.scheduler.engine_core import EngineCore
        from splitserve.tokenizer_svc.config import TokenizerServiceConfig
        from splitserve.tokenizer_svc.tokenizer import load_tokenizer
        from splitserve.worker.config import WorkerConfig
        from splitserve.worker.model_runner import ModelRunner

        picked = {
            cls: {f.name for f in dataclasses.fields(cls)}
            for cls in (WorkerConfig, SchedulerConfig, TokenizerServiceConfig)
        }
        unknown = set(kwargs) - set().union(*picked.values())
        if unknown:
            raise TypeError(f"LLM() got unknown options {sorted(unknown)}")

        def pick(cls, **extra):
            return cls(**{k: v for k, v in kwargs.items() if k in picked[cls]}, **extra)

        self.worker_config = pick(WorkerConfig, model=model)
        if self.worker_config.pipeline_parallel_size != 1:
            raise ValueError(
                "LLM runs the model in this one process: pipeline_parallel_size must be 1, got "
                f"{self.worker_config.pipeline_parallel_size} (`splitserve serve "
                "--pipeline-parallel-size P` runs one worker process per stage)"
            )
        self.scheduler_config = pick(SchedulerConfig)
        tok_cfg = pick(TokenizerServiceConfig, tokenizer=tokenizer or model)
        self.tokenizer = load_tokenizer(tok_cfg)
        self._tokenizer_config = tok_cfg
        self._grammars = None
        self.engine = EngineCore(
            self.scheduler_config, InprocExecutor(ModelRunner(self.worker_config))
        )
        self._ids = itertools.count()
        # The same path the gateway reads: the worker's Describe, through the engine's ModelInfo.
        self.sampling_defaults = SamplingDefaults.from_proto(
            self.engine.model_info.sampling_defaults
        )
        self.sampling_defaults.warn_if_changed()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's defaults (generation_config.json and
        override_generation_config) over splitserve's own; a fresh object each call."""
        return SamplingParams(**self.sampling_defaults.as_dict())

    def get_tokenizer(self):
        return self.tokenizer.tokenizer

    def _compile(self, sp: SamplingParams):
        """The CompiledGrammar of sp.structured_outputs (None without one); ValueError when the
        constraint is refused."""
        if sp.structured_outputs is None:
            return None
        from splitserve.tokenizer_svc.grammar import GrammarError
        from splitserve.tokenizer_svc.server import make_grammar_compiler

        if self._grammars is None:
            self._grammars = make_grammar_compiler(self._tokenizer_config, self.tokenizer)
        try:
            return self._grammars.compile_sync(sp.structured_outputs.to_proto()).grammar
        except GrammarError as exc:
            raise ValueError(exc.message) from None

    def _tokenize_bad_words(self, sp: SamplingParams) -> SamplingParams:
        """A copy of sp with bad_words tokenized (both spellings, no special tokens)."""
        if not sp.bad_words or sp.bad_words_token_ids is not None:
            return sp
        seqs: dict[tuple[int, ...], None] = {}
        for word in sp.bad_words:
            for text in bad_word_variants(word):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    seqs[ids] = None
        return dataclasses.replace(sp, bad_words_token_ids=[list(s) for s in seqs])

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict] | Sequence[int] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt and return in prompt order. A prompt is text, token ids,
        or vLLM's prompt dict: {"prompt": text} or {"prompt_token_ids": ids}, optionally with
        "cache_salt" (only prompts with the same salt share prefix-cache blocks). With
        `lora_request` (one for all prompts, or one per prompt) through that LoRA adapter,
        whose path must lie inside `lora_root` (or a `lora_modules` folder). Without
        `sampling_params`, `get_default_sampling_params()`. As in vLLM, `use_tqdm` shows a
        progress bar over the prompts (True, or a tqdm-like callable), and `priority` (one
        int per prompt, lower first) orders the waiting queue."""
        batch = _as_batch(prompts)
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(batch)
        if len(params_list) != len(batch):
            raise ValueError(f"{len(params_list)} sampling params for {len(batch)} prompts")
        texts: list[str | None] = []
        ids_list: list[list[int]] = []
        salts: list[str] = []
        for p in batch:
            salt = ""
            if isinstance(p, dict):
                p, salt = _unpack_prompt_dict(p)
            salts.append(salt)
            if isinstance(p, str):
                texts.append(p)
                ids_list.append(self.tokenizer.encode(p, add_special_tokens=True))
            else:
                texts.append(None)
                ids_list.append(list(p))
        loras = (
            list(lora_request)
            if isinstance(lora_request, Sequence)
            else [lora_request] * len(batch)
        )
        if len(loras) != len(batch):
            raise ValueError(f"{len(loras)} LoRA requests for {len(batch)} prompts")
        if priority is not None and len(priority) != len(batch):
            raise ValueError(f"{len(priority)} priorities for {len(batch)} prompts")
        return self._run(texts, ids_list, params_list, loras, salts, priority, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template (or `chat_template`, which
        an in-process caller is trusted to pass), with `tools` and `chat_template_kwargs`,
        then generate; vLLM's LLM.chat arguments."""
        from splitserve.tokenizer_svc.chat import ChatRenderer, parse_chat_request

        if chat_template_content_format != "auto":
            raise ValueError(
                "chat_template_content_format: only 'auto' is supported (the template decides "
                f"how message content is passed), got {chat_template_content_format!r}"
            )
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        renderer = ChatRenderer(self.tokenizer, trust_request_chat_template=True)
        texts, ids_list = [], []
        for conv in convs:
            req = parse_chat_request(
                json.dumps(conv),
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                tools_json=None if tools is None else json.dumps(tools),
                chat_template_kwargs_json=None
                if chat_template_kwargs is None
                else json.dumps(chat_template_kwargs),
            )
            rendered = renderer.render(req)
            texts.append(rendered.prompt)
            ids_list.append(list(rendered.token_ids))
        # The template wrote the special tokens: the token ids go in as they are.
        outs = self.generate(
            ids_list, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request
        )
        for out, text in zip(outs, texts, strict=True):
            out.prompt = text
        return outs

    def _run(
        self, texts, ids_list, params_list, loras=None, salts=None, priorities=None, use_tqdm=False
    ) -> list[RequestOutput]:
        from splitserve.tokenizer_svc.stream import SequenceStream

        seqs: dict[str, _Seq] = {}
        sched = self.engine.scheduler
        grammars = [self._compile(sp) for sp in params_list]
        params_list = [self._tokenize_bad_words(sp) for sp in params_list]
        for pi, (ids, sp) in enumerate(zip(ids_list, params_list)):
            lora = loras[pi] if loras else None
            for i in range(sp.n):
                proto = sp.to_proto()
                if sp.seed is not None:
                    proto.seed = sp.seed + i  # n sequences differ yet stay reproducible
                rid = f"llm-{next(self._ids)}"
                stream = (
                    SequenceStream(
                        self.tokenizer,
                        ids,
                        sp.skip_special_tokens,
                        sp.stop,
                        sp.include_stop_str_in_output,
                    )
                    if sp.detokenize
                    else None
                )
                seqs[rid] = _Seq(i, pi, stream)
                try:
                    sched.add_request(
                        scheduler_pb2.GenerateRequest(
                            request_id=rid,
                            prompt_token_ids=ids,
                            sampling_params=proto,
                            lora_name=lora.lora_name if lora else "",
                            lora_path=str(lora.lora_path) if lora else "",
                            lora_int_id=lora.lora_int_id if lora else 0,
                            cache_salt=salts[pi] if salts else "",
                            priority=priorities[pi] if priorities else 0,
                        ),
                        grammars[pi],
                    )
                except Exception as exc:
                    for r in list(seqs)[:-1]:
                        sched.abort_request(r)
                    raise ValueError(getattr(exc, "message", str(exc))) from exc
        bar = _progress_bar(use_tqdm, len(ids_list))
        left = {pi: p.n for pi, p in enumerate(params_list)}

        def ended(seq: _Seq) -> None:
            left[seq.prompt_idx] -= 1
            if bar is not None and left[seq.prompt_idx] == 0:
                bar.update(1)

        while self.engine.has_work:
            for out in self.engine.step():
                s = seqs[out.request_id]
                s.num_cached_tokens = out.num_cached_tokens
                s.prompt_logprobs.extend(out.prompt_logprobs)
                s.token_ids.extend(out.token_ids)
                s.logprobs.extend(out.logprobs)
                if out.error:
                    for rid in seqs:  # the call fails: its other requests must not linger
                        sched.abort_request(rid)
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                if s.stream is not None and s.finish_reason is None:
                    d = s.stream.push(out.token_ids)
                    s.text.append(d.text)
                    if d.stopped:
                        s.finish_reason, s.stop_reason = "stop", d.stop_reason
                        sched.abort_request(out.request_id)
                        ended(s)
                        continue
                if out.finished:
                    if s.finish_reason is None:
                        ended(s)
                    s.finish_reason = _FINISH[out.finish_reason]
                    s.stop_reason = out.stop_token_id
                    if s.stream is not None:
                        d = s.stream.finish()
                        s.text.append(d.text)
                        if d.stopped:
                            s.finish_reason, s.stop_reason = "stop", d.stop_reason
        if bar is not None:
            bar.close()
        results = []
        for pi, (text, ids) in enumerate(zip(texts, ids_list)):
            mine = sorted((s for s in seqs.values() if s.prompt_idx == pi), key=lambda s: s.index)
            want_lp = params_list[pi].logprobs is not None
            outs = [
                CompletionOutput(
                    index=s.index,
                    text="".join(s.text),
                    token_ids=s.token_ids,
                    logprobs=s.logprobs if want_lp else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    cumulative_logprob=sum(x.logprob for x in s.logprobs) if want_lp else None,
                )
                for s in mine
            ]
            results.append(
                RequestOutput(
                    request_id=str(pi),
                    prompt=text,
                    prompt_token_ids=ids,
                    outputs=outs,
                    prompt_logprobs=mine[0].prompt_logprobs
                    if params_list[pi].prompt_logprobs is not None
                    else None,
                    num_cached_tokens=mine[0].num_cached_tokens,
                )
            )
        return results

    def embed(
        self,
        prompts,
        pooling_params=None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ):
        """vLLM's LLM.embed (needs runner="pooling"): one EmbeddingRequestOutput per prompt,
        in order, its embedding in `.outputs.embedding`. See splitserve.llm_embed."""
        from splitserve.llm_embed import embed

        return embed(self, prompts, pooling_params, truncate_prompt_tokens, use_tqdm, lora_request)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


_PROMPT_KEYS = {"prompt", "prompt_token_ids", "cache_salt"}


def _unpack_prompt_dict(p: dict) -> tuple[str | list[int], str]:
    """vLLM's TextPrompt / TokensPrompt: (text or token ids, cache salt)."""
    unknown = sorted(set(p) - _PROMPT_KEYS)
    if unknown:
        raise ValueError(
            f"prompt dict keys {unknown} are not supported; expected 'prompt' or "
            "'prompt_token_ids', optionally with 'cache_salt'"
        )
    if ("prompt" in p) == ("prompt_token_ids" in p):
        raise ValueError("a prompt dict needs exactly one of 'prompt' and 'prompt_token_ids'")
    salt = p.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return (p["prompt"] if "prompt" in p else list(p["prompt_token_ids"])), salt or ""


def _as_batch(prompts) -> list:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return prompts


def _progress_bar(use_tqdm: bool | Callable[..., Any], total: int):
    """vLLM's progress bar over the prompts: tqdm for True, the callable itself when one is
    given (a tqdm-like class), none for False."""
    if use_tqdm is False or use_tqdm is None:
        return None
    if use_tqdm is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
    return use_tqdm(total=total, desc="Processed prompts")
