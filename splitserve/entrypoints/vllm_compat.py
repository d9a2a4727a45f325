"""vLLM flags that splitserve accepts with the one value that describes what it does.

A vLLM script carries flags such as `--tensor-parallel-size 1` or `--data-parallel-size 1`.
Each row of `PINNED` names such a flag, the value(s) that match splitserve's behaviour, and
what to use instead; any other value exits 2 with that message, never silently ignored. The
rows are the single source of these flags: `--help` lists them with their meaning, and every
service subcommand gets the rows that concern it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass

ALL = frozenset({"gateway", "scheduler", "worker", "tokenizer"})


def _int(text: str) -> object:
    """A whole number as int ("4", "4.0"); anything else is left as given."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


def _word(text: str) -> object:
    return text.strip().lower()


def _compilation(text: str) -> object:
    """A --compilation-config / -O value as its level: -O0 and '{"level": 0}' mean none."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict) and set(value) <= {"level", "mode"}:
        levels = set(value.values())
        if len(levels) == 1:
            return levels.pop()
    return value if isinstance(value, int) else text


@dataclass(frozen=True)
class Pinned:
    """One vLLM flag splitserve accepts only with `accepted` values."""

    flag: str
    """The vLLM flag, e.g. --tensor-parallel-size."""
    meaning: str
    """What the flag does in vLLM, for --help."""
    accepted: tuple
    """Values (after `parse`) that describe splitserve; empty: the flag is refused whatever
    its value. For a boolean flag, the accepted truth values."""
    instead: str
    """Why other values are refused and what splitserve offers instead."""
    services: frozenset = ALL
    """Subcommands that take the flag (serve takes every row)."""
    boolean: bool = False
    """A switch (--flag / --no-flag) rather than a flag with a value."""
    aliases: tuple[str, ...] = ()
    """Other spellings vLLM accepts (-tp, -O)."""
    parse: Callable[[str], object] = _word
    """Normalises a given value before it is compared with `accepted`."""

    @property
    def dest(self) -> str:
        return "pinned_" + self.flag.lstrip("-").replace("-", "_")

    def check(self, value: object) -> None:
        """Raise ValueError naming the flag, the value and what splitserve supports."""
        parsed = value if self.boolean else self.parse(str(value))
        if parsed in self.accepted:
            return
        if self.boolean:
            given = self.flag if value else "--no-" + self.flag[2:]
            raise ValueError(f"{given}: {self.instead}")
        raise ValueError(f"{self.flag} {value}: {self.instead}")

    def help_text(self) -> str:
        if not self.accepted:
            allowed = "refused"
        elif self.boolean:
            allowed = "accepted only " + ("on" if True in self.accepted else "off")
        else:
            allowed = "accepted only as " + " or ".join(str(v) for v in self.accepted)
        return f"vLLM: {self.meaning} splitserve: {allowed} ({self.instead})"


_W, _S, _T, _G = "worker", "scheduler", "tokenizer", "gateway"

PINNED: tuple[Pinned, ...] = (
    Pinned(
        "--data-parallel-size",
        "runs N engine replicas behind one server.",
        (1,),
        "splitserve runs one engine per stack; for more replicas run more "
        "scheduler/worker sets (splitserve scheduler / splitserve worker) behind a load balancer",
        frozenset({_S, _W}),
        aliases=("-dp",),
        parse=_int,
    ),
    Pinned(
        "--distributed-executor-backend",
        "how workers are launched (mp, ray, uni, external_launcher).",
        ("mp",),
        "splitserve always runs each worker (pipeline stage x tensor-parallel rank) as its "
        "own process (mp)",
        frozenset({_W}),
    ),
    Pinned(
        "--preemption-mode",
        "what happens to a preempted request's KV cache.",
        ("recompute",),
        "splitserve preempts by recompute only (no CPU swap)",
        frozenset({_S}),
    ),
    Pinned(
        "--logprobs-mode",
        "what returned logprobs are computed from.",
        ("raw_logprobs",),
        "splitserve returns logprobs of the raw logits, before temperature, penalties or "
        "top-k/top-p (raw_logprobs)",
        frozenset({_W}),
    ),
    Pinned(
        "--task",
        "the task the model runs (generate, embed, classify, ...).",
        ("auto", "generate"),
        "vLLM's older spelling; for embeddings use --runner pooling (--convert embed), "
        "classify / score / reward are not served",
        frozenset({_W}),
    ),
    Pinned(
        "--model-impl",
        "which implementation of the model to use (vllm, transformers).",
        ("auto", "vllm"),
        "splitserve always runs its own model implementation",
        frozenset({_W}),
    ),
    Pinned(
        "--cpu-offload-gb",
        "GiB of weights kept in CPU memory and streamed to the GPU.",
        (0,),
        "splitserve keeps all weights on the worker's device; use more pipeline or "
        "tensor-parallel ranks (--pipeline-parallel-size, --tensor-parallel-size) for a model "
        "that does not fit",
        frozenset({_W}),
        parse=_int,
    ),
    Pinned(
        "--swap-space",
        "GiB of CPU swap for preempted requests (unused by vLLM's V1 engine).",
        (4,),
        "splitserve preempts by recompute and never swaps; only vLLM's default 4 is accepted",
        frozenset({_S, _W}),
        parse=_int,
    ),
    Pinned(
        "--num-scheduler-steps",
        "decode steps per scheduling round (vLLM V0 multi-step).",
        (1,),
        "splitserve schedules every step; overlap comes from --async-scheduling-depth",
        frozenset({_S}),
        parse=_int,
    ),
    Pinned(
        "--lora-dtype",
        "dtype of LoRA weights.",
        ("auto",),
        "adapters always take the base model's dtype",
        frozenset({_W}),
    ),
    Pinned(
        "--expert-placement-strategy",
        "how experts are laid out over expert-parallel ranks (linear or round_robin).",
        ("linear",),
        "with --enable-expert-parallel each rank holds a contiguous range of experts (EPLB "
        "places them by load instead)",
        frozenset({_W}),
    ),
    Pinned(
        "--all2all-backend",
        "the token exchange of expert parallelism (DeepEP, pplx, allgather/reducescatter...).",
        ("allgather_reducescatter",),
        "splitserve's expert parallelism sends each token to its experts' ranks and back with "
        "torch.distributed all_to_all_single over the stage's group; only vLLM's default "
        "value is accepted, no other kernel library is used",
        frozenset({_W}),
    ),
    Pinned(
        "--fully-sharded-loras",
        "shards LoRA computation over tensor-parallel ranks.",
        (False,),
        "LoRA is refused under tensor parallelism (--enable-lora needs "
        "--tensor-parallel-size 1), so a fully-sharded LoRA has nothing to shard",
        frozenset({_W}),
        boolean=True,
    ),
    Pinned(
        "--compilation-config",
        "torch.compile settings (level, CUDA graph sizes, ...).",
        (0,),
        "splitserve does not use torch.compile, so only level 0 fits; CUDA graphs are set "
        "with --cuda-graph-sizes, --max-cudagraph-capture-size and --enforce-eager",
        frozenset({_W}),
        aliases=("-O", "-cc"),
        parse=_compilation,
    ),
    Pinned(
        "--max-num-partial-prefills",
        "prompts prefilled in chunks at the same time.",
        (1,),
        "splitserve's chunked prefill keeps no separate partial-prefill limit",
        frozenset({_S}),
        parse=_int,
    ),
    Pinned(
        "--long-prefill-token-threshold",
        "prompt length past which a prefill counts as long (0: off).",
        (0,),
        "splitserve treats every prompt alike",
        frozenset({_S}),
        parse=_int,
    ),
    Pinned(
        "--tokenizer-pool-size",
        "asynchronous tokenizer pool (0: none; removed in current vLLM).",
        (0,),
        "the tokenizer service has its own threads: set --tokenizer-threads",
        frozenset({_T}),
        parse=_int,
    ),
    Pinned(
        "--disable-frontend-multiprocessing",
        "runs the API server in the engine's process.",
        (False,),
        "the gateway is always its own process, apart from the scheduler and workers",
        frozenset({_G}),
        boolean=True,
    ),
    Pinned(
        "--middleware",
        "imports Python ASGI middleware by name into the API server.",
        (),
        "splitserve does not import arbitrary Python into the gateway; put a reverse proxy "
        "in front of it instead",
        frozenset({_G}),
    ),
    Pinned(
        "--speculative-config",
        "turns on speculative decoding (draft model, EAGLE, MTP, n-gram) from a JSON spec.",
        (),
        "splitserve has no speculative decoding yet; drop the flag",
        frozenset({_S, _W}),
    ),
    Pinned(
        "--kv-transfer-config",
        "plugs in a KV connector (disaggregated prefill/decode, external KV stores).",
        (),
        "splitserve has no KV connector; drop the flag",
        frozenset({_S, _W}),
    ),
    Pinned(
        "--kv-events-config",
        "publishes KV-cache block events for KV-aware routers.",
        (),
        "splitserve publishes no KV events; the scheduler's GetStats RPC and /metrics report "
        "the cache",
        frozenset({_S}),
    ),
    Pinned(
        "--kv-offloading-size",
        "GiB of CPU memory used as a second tier of KV cache.",
        (),
        "splitserve keeps the KV cache on the worker's device only",
        frozenset({_S, _W}),
    ),
    Pinned(
        "--prefix-caching-hash-algo",
        "the hash that keys prefix-cache blocks.",
        ("sha256",),
        "splitserve keys blocks with a SHA-256 chain",
        frozenset({_S}),
    ),
    Pinned(
        "--enable-sleep-mode",
        "lets the engine release its GPU memory through /sleep and /wake_up.",
        (False,),
        "splitserve workers keep their memory; there is no /sleep endpoint",
        frozenset({_W}),
        boolean=True,
    ),
    Pinned(
        "--calculate-kv-scales",
        "computes scales for an fp8 KV cache on the fly.",
        (False,),
        "an FP8 KV cache takes its scales from the checkpoint (k_scale / v_scale), or 1.0",
        frozenset({_W}),
        boolean=True,
    ),
    Pinned(
        "--disable-custom-all-reduce",
        "uses NCCL instead of vLLM's own all-reduce between tensor-parallel GPUs.",
        (True, False),
        "splitserve's tensor-parallel all-reduce is always torch.distributed's (NCCL on CUDA, "
        "gloo on CPU), the one vLLM falls back to when its own cannot run; both values are "
        "accepted",
        frozenset({_W}),
        boolean=True,
    ),
    Pinned(
        "--disable-cascade-attn",
        "turns off cascade (shared-prefix) attention.",
        (True, False),
        "splitserve has no cascade attention; both values are accepted",
        frozenset({_W}),
        boolean=True,
    ),
    Pinned(
        "--decode-context-parallel-size",
        "splits the decode KV cache over the GPUs of a tensor-parallel group.",
        (1,),
        "splitserve has no context parallelism",
        frozenset({_W}),
        aliases=("-dcp",),
        parse=_int,
    ),
    Pinned(
        "--optimization-level",
        "an optimisation preset (torch.compile passes and CUDA-graph mode).",
        (0,),
        "splitserve does not use torch.compile; CUDA graphs are set with --cuda-graph-sizes "
        "and --enforce-eager",
        frozenset({_W}),
        parse=_int,
    ),
    Pinned(
        "--logits-processors",
        "loads logits-processor classes by import path.",
        (),
        "splitserve does not import arbitrary Python into the worker; vLLM's request fields "
        "(logit_bias, allowed_token_ids, bad_words, min_tokens) are served",
        frozenset({_W}),
    ),
    Pinned(
        "--worker-extension-cls",
        "mixes a class, by import path, into the worker.",
        (),
        "splitserve does not import arbitrary Python into the worker",
        frozenset({_W}),
    ),
    Pinned(
        "--scheduler-cls",
        "replaces the scheduler class by import path.",
        (),
        "splitserve's scheduler is its own service (splitserve scheduler); it imports no "
        "user classes",
        frozenset({_S}),
    ),
    Pinned(
        "--max-long-partial-prefills",
        "how many long prompts may be prefilled in chunks at once.",
        (1,),
        "splitserve's chunked prefill keeps no separate partial-prefill limit",
        frozenset({_S}),
        parse=_int,
    ),
    Pinned(
        "--data-parallel-rank",
        "this engine's data-parallel rank (external load balancing).",
        (),
        "splitserve has no data parallelism: run independent stacks behind a load balancer",
        frozenset({_S, _W}),
        aliases=("-dpn",),
    ),
    Pinned(
        "--data-parallel-size-local",
        "data-parallel replicas on this node.",
        (),
        "splitserve has no data parallelism: run independent stacks behind a load balancer",
        frozenset({_S, _W}),
        aliases=("-dpl",),
    ),
    Pinned(
        "--data-parallel-address",
        "the head node's address for multi-node data parallelism.",
        (),
        "splitserve has no data parallelism: run independent stacks behind a load balancer",
        frozenset({_S, _W}),
        aliases=("-dpa",),
    ),
    Pinned(
        "--data-parallel-rpc-port",
        "the port data-parallel engines talk over.",
        (),
        "splitserve has no data parallelism: run independent stacks behind a load balancer",
        frozenset({_S, _W}),
        aliases=("-dpp",),
    ),
    Pinned(
        "--data-parallel-backend",
        "how data-parallel engines are launched (mp, ray).",
        ("mp",),
        "splitserve runs every process itself (mp)",
        frozenset({_S, _W}),
        aliases=("-dpb",),
    ),
    Pinned(
        "--nnodes",
        "nodes that one multi-node engine spans.",
        (1,),
        "`serve` runs on one host; on several hosts start `splitserve worker --rank N "
        "--tp-rank K` on each (with --distributed-init-method) and one `splitserve scheduler`",
        frozenset({_W}),
        aliases=("-n",),
        parse=_int,
    ),
    Pinned(
        "--node-rank",
        "this node's rank among --nnodes.",
        (0,),
        "`serve` runs on one host; see --nnodes",
        frozenset({_W}),
        aliases=("-r",),
        parse=_int,
    ),
    Pinned(
        "--headless",
        "runs the engine without the API server.",
        (False,),
        "start `splitserve scheduler` and `splitserve worker` without a gateway instead",
        frozenset({_G}),
        boolean=True,
    ),
    Pinned(
        "--api-server-count",
        "API server processes in front of the engine.",
        (1,),
        "run more `splitserve gateway` processes against the same --scheduler-address",
        frozenset({_G}),
        aliases=("-asc",),
        parse=_int,
    ),
    Pinned(
        "--uds",
        "serves HTTP on a Unix domain socket.",
        (),
        "the gateway listens on --host and --port",
        frozenset({_G}),
    ),
    Pinned(
        "--grpc",
        "serves vLLM's gRPC API instead of HTTP.",
        (False,),
        "splitserve serves the OpenAI HTTP API; its scheduler's gRPC API is "
        "splitserve.scheduler.v1 (protos/scheduler.proto)",
        frozenset({_G}),
        boolean=True,
    ),
    Pinned(
        "--stream-interval",
        "tokens buffered into one streamed chunk.",
        (1,),
        "splitserve streams every token as it comes",
        frozenset({_G}),
        parse=_int,
    ),
    Pinned(
        "--tool-parser-plugin",
        "imports a Python file that registers tool-call parsers.",
        ("",),
        "splitserve does not import arbitrary Python; use a built-in --tool-call-parser",
        frozenset({_G}),
    ),
    Pinned(
        "--reasoning-parser-plugin",
        "imports a Python file that registers reasoning parsers.",
        ("",),
        "splitserve does not import arbitrary Python; use a built-in --reasoning-parser",
        frozenset({_G}),
    ),
    Pinned(
        "--tool-server",
        "tool servers for the built-in tools of the Responses API.",
        (),
        "splitserve executes no tools; clients run the tool calls they receive",
        frozenset({_G}),
    ),
    Pinned(
        "--enable-force-include-usage",
        "adds usage to every response even when the client did not ask.",
        (False,),
        "ask per request with stream_options.include_usage",
        frozenset({_G}),
        boolean=True,
    ),
    Pinned(
        "--enable-log-outputs",
        "logs generated outputs with the requests.",
        (False,),
        "--enable-log-requests logs requests; outputs are not logged",
        frozenset({_G}),
        boolean=True,
    ),
    Pinned(
        "--enable-tokenizer-info-endpoint",
        "serves /tokenizer_info.",
        (False,),
        "use /tokenize and /detokenize",
        frozenset({_G}),
        boolean=True,
    ),
    Pinned(
        "--enable-prompt-embeds",
        "accepts prompt_embeds tensors in requests.",
        (False,),
        "requests carry text or token ids; prompt_embeds is refused",
        frozenset({_G}),
        boolean=True,
    ),
    Pinned(
        "--skip-tokenizer-init",
        "runs without a tokenizer (requests carry token ids).",
        (False,),
        "the tokenizer service always runs; token-id prompts work with it",
        frozenset({_T}),
        boolean=True,
    ),
    Pinned(
        "--hf-token",
        "the Hugging Face token for hub downloads.",
        (),
        "set HF_TOKEN in the environment (huggingface_hub reads it); a token on the command "
        "line would show in `ps`",
        frozenset({_W, _T}),
    ),
    Pinned(
        "--log-config-file",
        "a logging.config JSON file for the server's loggers.",
        (),
        "set levels with --log-level and --uvicorn-log-level",
        ALL,
    ),
)


def add_pinned_flags(parser: argparse.ArgumentParser, service: str | None) -> None:
    """The rows concerning `service` (None: all of them, for `serve`) as flags."""
    group = parser.add_argument_group(
        "vLLM flags with one supported value",
        "accepted so vLLM command lines keep working; any other value is refused",
    )
    for row in PINNED:
        if service is not None and service not in row.services:
            continue
        kwargs = {"dest": row.dest, "default": argparse.SUPPRESS, "help": row.help_text()}
        if row.boolean:
            group.add_argument(
                row.flag, *row.aliases, action=argparse.BooleanOptionalAction, **kwargs
            )
        else:
            group.add_argument(row.flag, *row.aliases, metavar="VALUE", **kwargs)


def check_pinned(args: argparse.Namespace) -> None:
    """Raise ValueError for the first pinned flag given a value splitserve cannot honour."""
    values = vars(args)
    for row in PINNED:
        if row.dest in values:
            row.check(values[row.dest])
