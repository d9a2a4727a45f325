"""vLLM flags that splitserve accepts with the one value that describes what it does.

A vLLM script carries flags such as `--tensor-parallel-size 1` or `--kv-cache-dtype auto`.
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
        "--tensor-parallel-size",
        "shards each layer over N GPUs.",
        (1,),
        "splitserve has no tensor parallelism; split the model over GPUs with "
        "--pipeline-parallel-size",
        frozenset({_W}),
        aliases=("-tp",),
        parse=_int,
    ),
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
        "--quantization",
        "loads quantized weights (awq, gptq, fp8, ...).",
        (),
        "splitserve loads unquantized checkpoints only; drop the flag",
        frozenset({_W}),
        aliases=("-q",),
    ),
    Pinned(
        "--kv-cache-dtype",
        "stores the KV cache in another dtype (fp8, ...).",
        ("auto",),
        "the KV cache always uses the model's --dtype",
        frozenset({_S, _W}),
    ),
    Pinned(
        "--distributed-executor-backend",
        "how workers are launched (mp, ray, uni, external_launcher).",
        ("mp",),
        "splitserve always runs each pipeline rank as its own process (mp)",
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
        "splitserve keeps all weights on the worker's device; use more pipeline ranks "
        "(--pipeline-parallel-size) for a model that does not fit",
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
        "--fully-sharded-loras",
        "shards LoRA computation over tensor-parallel ranks.",
        (False,),
        "splitserve has no tensor parallelism, so nothing to shard",
        frozenset({_W}),
        boolean=True,
    ),
    Pinned(
        "--enable-expert-parallel",
        "places MoE experts on different GPUs.",
        (False,),
        "splitserve has no expert parallelism; each pipeline rank holds its layers' experts",
        frozenset({_W}),
        boolean=True,
    ),
    Pinned(
        "--enable-eplb",
        "rebalances MoE experts across GPUs at run time.",
        (False,),
        "splitserve has no expert rebalancing yet",
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
        aliases=("-O",),
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
            group.add_argument(row.flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(row.flag, *row.aliases, metavar="VALUE", **kwargs)


def check_pinned(args: argparse.Namespace) -> None:
    """Raise ValueError for the first pinned flag given a value splitserve cannot honour."""
    values = vars(args)
    for row in PINNED:
        if row.dest in values:
            row.check(values[row.dest])
