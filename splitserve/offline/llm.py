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

from splitserve.common import messages as msg
from splitserve.common.generation_config import SamplingDefaults
from splitserve.common.lora import LoRARequest
from splitserve.common.messages_proto import compiled_grammar_from_proto, mm_input_from_proto
from splitserve.common.sampling_params import SamplingParams
from splitserve.offline.prompts import as_batch, progress_bar, unpack_prompt_dict


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[msg.TokenLogprobs] | None
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
    prompt_logprobs: list[msg.TokenLogprobs] | None = None
    num_cached_tokens: int = 0
    finished: bool = True


@dataclass
class _Seq:
    index: int
    prompt_idx: int
    proc: object
    """The sequence's OutputProcessor (the one the gateway runs too)."""
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
        from splitserve.entrypoints.vllm_compat import PINNED
        from splitserve.offline.inproc_executor import InprocExecutor
        from splitserve.scheduler.config import SchedulerConfig
        from splitserve.scheduler.engine_core import EngineCore
        from splitserve.tokenizer_svc.config import TokenizerServiceConfig
        from splitserve.tokenizer_svc.tokenizer import load_tokenizer
        from splitserve.worker.config import WorkerConfig
        from splitserve.worker.model_runner import ModelRunner

        # vLLM arguments splitserve takes with one value (tensor_parallel_size=1, ...): checked,
        # then dropped; any other value is a ValueError saying what to use instead.
        for row in PINNED:
            name = row.flag[2:].replace("-", "_")
            if name in kwargs:
                value = kwargs.pop(name)
                if value is not None:  # vLLM's LLM takes None for "not set"
                    row.check(value)
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
        if self.worker_config.tensor_parallel_size != 1:
            raise ValueError(
                "LLM runs the model in this one process: tensor_parallel_size must be 1, got "
                f"{self.worker_config.tensor_parallel_size} (`splitserve serve "
                "--tensor-parallel-size T` runs one worker process per rank)"
            )
        if self.worker_config.cpu_omp_threads_bind not in ("auto", "nobind"):
            raise ValueError(
                "LLM runs in this process, whose OpenMP threads exist before it starts: "
                f"cpu_omp_threads_bind={self.worker_config.cpu_omp_threads_bind!r} cannot "
                "pin them (set OMP_PLACES / OMP_PROC_BIND before importing torch, or use "
                "`splitserve serve --cpu-omp-threads-bind`)"
            )
        self.scheduler_config = pick(SchedulerConfig)
        tok_cfg = pick(TokenizerServiceConfig, tokenizer=tokenizer or model)
        self.tokenizer = load_tokenizer(tok_cfg)
        self._tokenizer_config = tok_cfg
        self._adapter_tokenizers = self._init_adapter_tokenizers(tok_cfg)
        self._grammars = None
        runner = ModelRunner(self.worker_config)
        self._images = self._image_preprocessor(runner, tok_cfg)
        self._audio = self._audio_preprocessor(runner, tok_cfg)
        self.engine = EngineCore(self.scheduler_config, InprocExecutor(runner))
        self._ids = itertools.count()
        # The same path the gateway reads: the worker's Describe, through the engine's ModelInfo.
        self.sampling_defaults = SamplingDefaults.from_proto(
            self.engine.model_info.sampling_defaults
        )
        self.sampling_defaults.warn_if_changed()

    @staticmethod
    def _image_preprocessor(runner, tok_cfg):
        """The model folder's processor when the model takes images, else None."""
        if not getattr(runner.model, "supports_images", False):
            return None
        from splitserve.common.mm_limits import parse_mm_limits
        from splitserve.tokenizer_svc.config import mm_cache_bytes
        from splitserve.tokenizer_svc.multimodal import ImagePreprocessor, ProcessedImageCache

        cache_bytes = mm_cache_bytes(tok_cfg)
        return ImagePreprocessor(
            str(runner.loaded.path),
            runner.model.image_token_id,
            parse_mm_limits(tok_cfg.limit_mm_per_prompt),
            ProcessedImageCache(cache_bytes) if cache_bytes else None,
            tok_cfg.trust_remote_code,
        )

    @staticmethod
    def _audio_preprocessor(runner, tok_cfg):
        """The model folder's processor when the model takes audio, else None."""
        if getattr(runner.model, "is_encoder_decoder", False):
            from transformers import AutoTokenizer

            from splitserve.tokenizer_svc.whisper_processor import WhisperPreprocessor

            path = str(runner.loaded.path)
            return WhisperPreprocessor(path, AutoTokenizer.from_pretrained(path))
        if not getattr(runner.model, "supports_audio", False):
            return None
        from splitserve.common.mm_limits import parse_mm_limits
        from splitserve.tokenizer_svc.audio_processor import AudioPreprocessor

        return AudioPreprocessor(
            str(runner.loaded.path),
            runner.model.audio_token_id,
            parse_mm_limits(tok_cfg.limit_mm_per_prompt),
            tok_cfg.trust_remote_code,
        )

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's defaults (generation_config.json and
        override_generation_config) over splitserve's own; a fresh object each call."""
        return SamplingParams(**self.sampling_defaults.as_dict())

    def _init_adapter_tokenizers(self, tok_cfg):
        from splitserve.common.lora import allowed_roots, parse_lora_modules
        from splitserve.tokenizer_svc.adapter_tokenizers import AdapterTokenizers

        cfg = self.worker_config
        roots = allowed_roots(cfg.lora_root, parse_lora_modules(cfg.lora_modules))
        return AdapterTokenizers(tok_cfg, self.tokenizer, roots)

    def _tokenizer_for(self, lora: LoRARequest | None):
        """The adapter folder's tokenizer (its added tokens), else the model's."""
        if lora is None or not self.worker_config.enable_lora:
            return self.tokenizer
        return self._adapter_tokenizers.get(str(lora.lora_path))

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
            compiled = self._grammars.compile_sync(sp.structured_outputs.to_proto()).grammar
        except GrammarError as exc:
            raise ValueError(exc.message) from None
        return compiled_grammar_from_proto(compiled)  # once per request: the engine's form

    def _tokenize_bad_words(self, sp: SamplingParams, tokenizer=None) -> SamplingParams:
        """A copy of sp with bad_words tokenized as the tokenizer service's Prepare does (the
        same function: both spellings, no special tokens)."""
        if not sp.bad_words or sp.bad_words_token_ids is not None:
            return sp
        from splitserve.tokenizer_svc.prepare import bad_words_token_ids

        ids = bad_words_token_ids(tokenizer or self.tokenizer, sp.bad_words)
        return dataclasses.replace(sp, bad_words_token_ids=ids)

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
        "cache_salt" (only prompts with the same salt share prefix-cache blocks), and for
        models that take images "multi_modal_data": {"image": PIL image or list of them},
        with one image placeholder (LLaVA: "<image>") in the prompt text per image. With
        `lora_request` (one for all prompts, or one per prompt) through that LoRA adapter,
        whose path must lie inside `lora_root` (or a `lora_modules` folder). Without
        `sampling_params`, `get_default_sampling_params()`. As in vLLM, `use_tqdm` shows a
        progress bar over the prompts (True, or a tqdm-like callable), and `priority` (one
        int per prompt, lower first) orders the waiting queue."""
        batch = as_batch(prompts)
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(batch)
        if len(params_list) != len(batch):
            raise ValueError(f"{len(params_list)} sampling params for {len(batch)} prompts")
        loras = (
            list(lora_request)
            if isinstance(lora_request, Sequence)
            else [lora_request] * len(batch)
        )
        if len(loras) != len(batch):
            raise ValueError(f"{len(loras)} LoRA requests for {len(batch)} prompts")
        texts: list[str | None] = []
        ids_list: list[list[int]] = []
        salts: list[str] = []
        mm_list: list[list] = []
        for p, lora in zip(batch, loras, strict=True):
            salt, images = "", None
            if isinstance(p, dict):
                p, salt, images = unpack_prompt_dict(p)
            salts.append(salt)
            mm_list.append([])
            if images is not None:
                processed = self._process_images(p, images)
                texts.append(p)
                ids_list.append(processed.token_ids)
                mm_list[-1] = processed.mm_inputs
            elif isinstance(p, str):
                texts.append(p)
                tokenizer = self._tokenizer_for(lora)
                ids_list.append(tokenizer.encode(p, add_special_tokens=True))
            else:
                texts.append(None)
                ids_list.append(list(p))
        if priority is not None and len(priority) != len(batch):
            raise ValueError(f"{len(priority)} priorities for {len(batch)} prompts")
        return self._run(texts, ids_list, params_list, loras, salts, priority, use_tqdm, mm_list)

    def _process_images(self, prompt, data: dict):
        """Run the model's processor over a text prompt and its images or audio (ValueError
        when the model takes none or the input is bad)."""
        if not isinstance(prompt, str):
            raise ValueError(
                "multi_modal_data needs a text prompt (with the image or audio placeholders)"
            )
        if not isinstance(data, dict) or len(data) != 1 or set(data) - {"image", "audio"}:
            raise ValueError(
                "multi_modal_data must be a dict with one key, 'image' or 'audio', got "
                f"{type(data).__name__}"
                + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
            )
        kind = next(iter(data))
        if (self._images if kind == "image" else self._audio) is None:
            raise ValueError(
                f"multi_modal_data was given, but the model {self.worker_config.model!r} does "
                f"not take {kind} inputs"
            )
        if kind == "audio":
            return self._audio.process(prompt, _audio_items(data["audio"]))
        images = data.get("image")
        images = list(images) if isinstance(images, list | tuple) else [images]
        from PIL import Image

        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(
                    f"multi_modal_data['image'][{i}] must be a PIL image, got "
                    f"{type(image).__name__}"
                )
        return self._images.process_images(prompt, images)

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
        then generate; vLLM's LLM.chat arguments. On a model that takes images, content parts
        may be `{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}` or
        `{"type": "image_pil", "image_pil": pil_image}`."""
        from splitserve.tokenizer_svc.chat import ChatRenderer, parse_chat_request

        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(
                "chat_template_content_format must be 'auto', 'string' or 'openai', got "
                f"{chat_template_content_format!r}"
            )
        cfg = self._tokenizer_config
        content_format = (
            cfg.chat_template_content_format
            if chat_template_content_format == "auto"
            else chat_template_content_format
        )
        n = len(convs)
        loras = list(lora_request) if isinstance(lora_request, Sequence) else [lora_request] * n
        if len(loras) != n:
            raise ValueError(f"{len(loras)} LoRA requests for {n} conversations")
        renderers: dict[int, ChatRenderer] = {}  # one per tokenizer (an adapter may have its own)
        placeholder = self._images.image_token if self._images is not None else None
        texts, ids_list, mm_list = [], [], []
        for conv, lora in zip(convs, loras, strict=True):
            tokenizer = self._tokenizer_for(lora)
            renderer = renderers.get(id(tokenizer))
            if renderer is None:
                renderer = renderers[id(tokenizer)] = ChatRenderer(
                    tokenizer, trust_request_chat_template=True, content_format=content_format
                )
            conv, images = _take_chat_images(conv) if placeholder else (conv, [])
            req = parse_chat_request(  # InvalidRequest (a ValueError) for bad messages
                json.dumps(conv),
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                tools_json=None if tools is None else json.dumps(tools),
                chat_template_kwargs_json=None
                if chat_template_kwargs is None
                else json.dumps(chat_template_kwargs),
                image_placeholder=placeholder,
                content_format=renderer.content_format(chat_template),
            )
            if images:
                processed = self._images.process_images(
                    renderer.render_prompt(req), images, add_special_tokens=False
                )
                texts.append(processed.prompt)
                ids_list.append(processed.token_ids)
                mm_list.append(processed.mm_inputs)
                continue
            rendered = renderer.render(req)
            texts.append(rendered.prompt)
            ids_list.append(list(rendered.token_ids))
            mm_list.append([])
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        params_list = list(params) if isinstance(params, Sequence) else [params] * n
        if len(params_list) != n:
            raise ValueError(f"{len(params_list)} sampling params for {n} conversations")
        return self._run(texts, ids_list, params_list, loras, use_tqdm=use_tqdm, mm_list=mm_list)

    def _run(
        self,
        texts,
        ids_list,
        params_list,
        loras=None,
        salts=None,
        priorities=None,
        use_tqdm=False,
        mm_list=None,
    ) -> list[RequestOutput]:
        from splitserve.tokenizer_svc.output_processor import OutputProcessor
        from splitserve.tokenizer_svc.stream import SequenceStream

        seqs: dict[str, _Seq] = {}
        sched = self.engine.scheduler
        eos = set(sched.eos_token_ids)
        if self.tokenizer.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.tokenizer.eos_token_id)
        eos = frozenset(eos)
        grammars = [self._compile(sp) for sp in params_list]
        # NOTE: the image processor builds wire messages; converted once per prompt here.
        mm_inputs = [[mm_input_from_proto(m) for m in items] for items in mm_list or ()]
        tokenizers = [
            self._tokenizer_for(loras[pi] if loras else None) for pi in range(len(ids_list))
        ]
        params_list = [
            self._tokenize_bad_words(sp, tok) for sp, tok in zip(params_list, tokenizers)
        ]
        for pi, (ids, sp) in enumerate(zip(ids_list, params_list)):
            lora = loras[pi] if loras else None
            for i in range(sp.n):
                params = sp.to_engine()
                if sp.seed is not None:
                    params.seed = sp.seed + i  # n sequences differ yet stay reproducible
                rid = f"llm-{next(self._ids)}"
                stream = (
                    SequenceStream(
                        tokenizers[pi],
                        ids,
                        sp.skip_special_tokens,
                        sp.stop,
                        sp.include_stop_str_in_output,
                    )
                    if sp.detokenize
                    else None
                )
                proc = OutputProcessor(
                    stream,
                    len(ids),
                    has_stop_strings=bool(sp.stop),
                    include_stop_str_in_output=sp.include_stop_str_in_output,
                    stop_token_ids=frozenset(sp.stop_token_ids),
                    eos=eos,
                    want_logprobs=True,
                )
                seqs[rid] = _Seq(i, pi, proc)
                try:
                    sched.add_request(
                        msg.GenerateRequest(
                            request_id=rid,
                            prompt_token_ids=list(ids),
                            sampling_params=params,
                            lora_name=lora.lora_name if lora else "",
                            lora_path=str(lora.lora_path) if lora else "",
                            lora_int_id=lora.lora_int_id if lora else 0,
                            cache_salt=salts[pi] if salts else "",
                            priority=priorities[pi] if priorities else 0,
                            mm_inputs=mm_inputs[pi] if mm_inputs else [],
                        ),
                        grammars[pi],
                    )
                except Exception as exc:
                    for r in list(seqs)[:-1]:
                        sched.abort_request(r)
                    raise ValueError(getattr(exc, "message", str(exc))) from exc
        bar = progress_bar(use_tqdm, len(ids_list))
        left = {pi: p.n for pi, p in enumerate(params_list)}

        def ended(seq: _Seq) -> None:
            left[seq.prompt_idx] -= 1
            if bar is not None and left[seq.prompt_idx] == 0:
                bar.update(1)

        while self.engine.has_work:
            for out in self.engine.step():
                s = seqs[out.request_id]
                if out.error:
                    for rid in seqs:  # the call fails: its other requests must not linger
                        sched.abort_request(rid)
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                if s.finish_reason is not None:
                    continue  # ended on a stop string; an output already in flight
                s.num_cached_tokens = out.num_cached_tokens
                s.prompt_logprobs.extend(out.prompt_logprobs)
                d = s.proc.process(
                    out.token_ids,
                    out.logprobs,
                    (),
                    out.finish_reason,
                    out.stop_token_id,
                    out.num_prompt_tokens,
                    out.num_cached_tokens,
                )
                if d is None:
                    continue
                s.text.append(d.text)
                s.token_ids.extend(d.token_ids)
                s.logprobs.extend(d.logprobs)
                if d.finish_reason is not None:
                    s.finish_reason, s.stop_reason = d.finish_reason, d.stop_reason
                    ended(s)
                    if s.proc.stopped_by_string and not out.finished:
                        sched.abort_request(out.request_id)
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
        in order, its embedding in `.outputs.embedding`. See splitserve.offline.llm_embed."""
        from splitserve.offline.llm_embed import embed

        return embed(self, prompts, pooling_params, truncate_prompt_tokens, use_tqdm, lora_request)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _take_chat_images(conv: list[dict]) -> tuple[list[dict], list]:
    """The conversation with its image parts (data: URLs, PIL images) replaced by
    `{"type": "image"}`, and the images in order; ValueError for an image it cannot take."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    from splitserve.tokenizer_svc.multimodal import to_rgb

    images: list = []
    out = []
    for i, message in enumerate(conv):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "image_pil":
                image = part.get("image_pil")
                if not isinstance(image, Image.Image):
                    raise ValueError(f"{where}.image_pil must be a PIL image")
            elif kind == "image_url":
                value = part.get("image_url")
                url = value.get("url") if isinstance(value, dict) else value
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise ValueError(
                        f"{where}: LLM.chat takes images as data: URLs or image_pil parts "
                        "(it fetches nothing)"
                    )
                header, _, payload = url[5:].partition(",")
                try:
                    if "base64" not in header.split(";")[1:]:
                        raise ValueError("only base64 data: URLs are supported")
                    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
                    image.load()
                except (ValueError, binascii.Error, UnidentifiedImageError, OSError) as exc:
                    raise ValueError(f"{where}: the image could not be decoded: {exc}") from None
            else:
                parts.append(part)
                continue
            images.append(to_rgb(image))
            parts.append({"type": "image"})
        out.append({**message, "content": parts})
    return out, images


def _audio_items(value) -> list[tuple]:
    """vLLM's multi_modal_data["audio"]: one (samples, sampling rate) pair or a list of them."""
    items = (
        [value] if isinstance(value, tuple) else list(value) if isinstance(value, list) else None
    )
    if items is None or not all(isinstance(v, tuple) and len(v) == 2 for v in items):
        raise ValueError(
            "multi_modal_data['audio'] must be a (samples, sampling_rate) pair or a list of "
            f"them, got {type(value).__name__}"
        )
    for i, (_, rate) in enumerate(items):
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            raise ValueError(f"multi_modal_data['audio'][{i}]: sampling rate {rate!r}")
    return items
