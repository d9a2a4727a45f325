"""`splitserve serve|gateway|scheduler|worker|tokenizer`: the whole stack, or one service."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys

if __name__ == "__main__" and not sys.flags.safe_path and sys.path[:1] == [os.getcwd()]:
    # NOTE: `python -m splitserve.entrypoints.cli` (without -P) put the working folder first on sys.path.
    # From the repository root its service folders (`kernels`, `scheduler`, ...) would then
    # shadow installed packages of those names (transformers imports Hugging Face's
    # `kernels`); nothing splitserve needs lives there, so drop it before anything imports.
    del sys.path[0]

from splitserve import __version__  # noqa: E402
from splitserve.common.tracing import setup_tracing
from splitserve.entrypoints.config_cli import add_config_flags, build_config, service_configs
from splitserve.entrypoints.config_file import expand_config_file
from splitserve.entrypoints.vllm_compat import add_pinned_flags, check_pinned

logger = logging.getLogger("splitserve")

# Fields the launcher sets itself (addresses of the processes it starts).
_WIRING = {"worker_addresses", "rank", "tp_rank"}


def _model_arg(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="model folder or Hugging Face hub id"
        + ("" if required else " (default: the built-in demo model)"),
    )
    p.add_argument(
        "--model",
        dest="model_flag",
        default=None,
        metavar="MODEL",
        help="the same as the positional MODEL, as vLLM also takes it",
    )
    p.set_defaults(_model_required=required)


def _resolve_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One model from the positional MODEL and vLLM's --model."""
    if not hasattr(args, "model_flag"):
        return
    flag, tag = args.model_flag, args.model_tag
    if flag is not None and tag is not None and flag != tag:
        parser.error(f"the model is given twice, as {tag!r} and as --model {flag!r}")
    args.model_tag = tag if tag is not None else flag
    if args.model_tag is None and args._model_required:
        parser.error(f"{args.command}: a model is required (MODEL or --model)")


def dashed_flags(argv: list[str]) -> list[str]:
    """vLLM takes `--max_num_seqs` for `--max-num-seqs`: the name part of every long flag
    (up to a `.` or `=`) with dashes; a dotted key and a value are left as they are."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            head, dot, keys = name.partition(".")
            arg = head.replace("_", "-") + dot + keys + eq + value
        out.append(arg)
    return out


def dotted_json_flags(argv: list[str]) -> list[str]:
    """vLLM's dotted form of a JSON flag: `--eplb-config.window_size 100` (or `=100`),
    `--hf-overrides.rope_scaling.factor 2.0`, `--x.key+ a,b` (a list). Each value is read as
    JSON (else kept as a string); the dotted keys of one flag are merged into one object, over
    the flag's whole-JSON value when that is given too (dotted keys win), and the flag is
    passed once, as that JSON."""
    objects: dict[str, dict] = {}
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        i += 1
        if not (arg.startswith("--") and "." in name):
            out.append(arg)
            continue
        if not eq:
            if i >= len(argv):
                raise SystemExit(f"splitserve: {arg} needs a value")
            value, i = argv[i], i + 1
        flag, *keys = name.split(".")
        parsed: object
        if keys[-1].endswith("+"):
            keys[-1], parsed = keys[-1][:-1], value.split(",")
        else:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
        node = objects.setdefault(flag, {})
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = parsed
    for flag, obj in objects.items():
        for j, arg in enumerate(out):  # the flag's whole-JSON value, if given
            if arg == flag and j + 1 < len(out):
                where, text = j + 1, out[j + 1]
            elif arg.startswith(flag + "="):
                where, text = j, arg[len(flag) + 1 :]
            else:
                continue
            try:
                base = json.loads(text)
            except ValueError:
                break
            if isinstance(base, dict):
                _merge(base, obj)
                obj = base
                del out[j : where + 1]
            break
        out += [flag, json.dumps(obj)]
    return out


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def build_parser() -> argparse.ArgumentParser:
    gateway_cfg, scheduler_cfg, worker_cfg, tokenizer_cfg = service_configs()
    # NOTE: allow_abbrev off everywhere: argparse would read vLLM's `--model X` as our
    # `--model-impl X`, and any prefix of a flag as the flag.
    parser = argparse.ArgumentParser(
        prog="splitserve",
        description="OpenAI-compatible LLM server split into gRPC services",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"splitserve {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("SPLITSERVE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # Kept for --config, which needs the flags of the command it fills.
    parser.set_defaults(_subparsers={})

    p = sub.add_parser("serve", help="start every service as its own process", allow_abbrev=False)
    _common(parser, p, "serve")
    _model_arg(p, required=False)
    add_config_flags(
        p,
        gateway_cfg,
        scheduler_cfg,
        worker_cfg,
        tokenizer_cfg,
        skip=_WIRING | {"model"},
        default_text={
            "scheduler_address": "a free loopback port",
            "tokenizer_address": "a free loopback port",
        },
    )
    add_pinned_flags(p, None)
    p.add_argument(
        "--log-level",
        dest="log_level",
        default=argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
    )

    p = sub.add_parser("gateway", help="the OpenAI HTTP gateway alone", allow_abbrev=False)
    _common(parser, p, "gateway")
    add_config_flags(p, gateway_cfg)
    add_pinned_flags(p, "gateway")

    p = sub.add_parser("scheduler", help="the scheduler alone", allow_abbrev=False)
    _common(parser, p, "scheduler")
    p.add_argument("--address", default="127.0.0.1:50052", help="where to listen")
    add_config_flags(p, scheduler_cfg)
    add_pinned_flags(p, "scheduler")

    p = sub.add_parser(
        "worker",
        help="one worker alone (pipeline stage --rank, tensor-parallel rank --tp-rank)",
        allow_abbrev=False,
    )
    _common(parser, p, "worker")
    _model_arg(p, required=True)
    p.add_argument("--address", default="127.0.0.1:50053", help="where to listen")
    add_config_flags(p, worker_cfg, skip={"model"})
    add_pinned_flags(p, "worker")

    p = sub.add_parser("tokenizer", help="the tokenizer service alone", allow_abbrev=False)
    _common(parser, p, "tokenizer")
    p.add_argument("--address", default="127.0.0.1:50051", help="where to listen")
    add_config_flags(p, tokenizer_cfg)
    add_pinned_flags(p, "tokenizer")
    return parser


def _common(parser: argparse.ArgumentParser, p: argparse.ArgumentParser, name: str) -> None:
    """--check-config and --config, which every command takes."""
    parser.get_default("_subparsers")[name] = p
    p.add_argument(
        "--check-config",
        action="store_true",
        help="parse and validate the configuration, print it as JSON and exit 0 "
        "without starting anything",
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="read flags from a YAML file of flag names (dashes or underscores) and values, "
        "as vLLM's --config; flags given on the command line win",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = dotted_json_flags(dashed_flags(list(sys.argv[1:] if argv is None else argv)))
    args = parser.parse_args(argv)
    _resolve_model(parser, args)
    if args.config is not None:
        try:
            argv = expand_config_file(
                argv,
                args.command,
                args._subparsers[args.command],
                None if not hasattr(args, "model_tag") else args.model_tag is not None,
            )
        except ValueError as exc:
            parser.error(str(exc))
        args = parser.parse_args(argv)
        _resolve_model(parser, args)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{args.command}] %(name)s: %(message)s",
    )
    gateway_cfg, scheduler_cfg, worker_cfg, tokenizer_cfg = service_configs()
    try:
        check_pinned(args)
        if args.check_config:
            return _check_config(args)
        if args.command == "serve":
            from splitserve.entrypoints.launcher import serve

            return serve(args)
        if args.command == "gateway":
            from splitserve.gateway.server import run_gateway, run_until_complete

            config = build_config(gateway_cfg, args)
            setup_tracing("splitserve-gateway", config.otlp_traces_endpoint)
            run_until_complete(run_gateway(config))
            return 0
        if args.command == "scheduler":
            from splitserve.scheduler.server import run_scheduler

            config = build_config(scheduler_cfg, args)
            setup_tracing("splitserve-scheduler", config.otlp_traces_endpoint)
            return asyncio.run(run_scheduler(config, args.address))
        if args.command == "worker":
            quiet_openmp_waits()
            config = build_config(worker_cfg, args, model=args.model_tag)
            bind_openmp_threads(config)
            from splitserve.worker.server import run_worker

            setup_tracing("splitserve-worker", config.otlp_traces_endpoint)
            asyncio.run(run_worker(config, args.address))
            return 0
        if args.command == "tokenizer":
            from splitserve.tokenizer_svc.server import run_tokenizer_service

            config = build_config(tokenizer_cfg, args)
            setup_tracing("splitserve-tokenizer", config.otlp_traces_endpoint)
            asyncio.run(run_tokenizer_service(config, args.address))
            return 0
    except (ValueError, FileNotFoundError) as exc:
        # A bad flag or model path: say what is wrong, no traceback.
        print(f"splitserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


def quiet_openmp_waits(environ=os.environ) -> None:
    """Unless the user chose otherwise, OpenMP threads of this process sleep between parallel
    regions instead of spinning. Must run before torch is imported.

    NOTE: a worker shares the machine's cores with the other services of the stack; spinning
    OpenMP threads (the default) burn the cores the scheduler, gateway and tokenizer need while
    the worker waits for its next step (4x the worker's CPU time per step on a 2-core machine,
    bench/stack_overhead.py). Steps start with a wake-up instead, which costs microseconds.
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def bind_openmp_threads(config, environ=os.environ) -> None:
    """Pin the worker's OpenMP threads as `--cpu-omp-threads-bind` says (`worker.cpu_threads`).
    Must run before torch is imported."""
    from splitserve.worker import cpu_threads

    # Every worker process of the grid gets its own cores (global rank order).
    cores = cpu_threads.apply(
        config.cpu_omp_threads_bind,
        config.device,
        config.rank * config.tensor_parallel_size + config.tp_rank,
        config.world_size,
        environ,
    )
    if cores:
        logging.getLogger(__name__).info("OpenMP threads pinned to cores %s", cores)


def _check_config(args: argparse.Namespace) -> int:
    """`--check-config`: build every config the command would use, print them, start nothing."""
    gateway_cfg, scheduler_cfg, worker_cfg, tokenizer_cfg = service_configs()
    address = {"address": args.address} if hasattr(args, "address") else {}
    if args.command == "serve":
        # The same configs `serve` builds, minus the ports it would pick at start-up.
        model = args.model_tag or "<built-in demo model>"
        tok = {} if getattr(args, "tokenizer", None) else {"tokenizer": model}
        configs = {
            "gateway": build_config(gateway_cfg, args, model=model),
            "scheduler": build_config(scheduler_cfg, args),
            "worker": build_config(worker_cfg, args, model=model),
            "tokenizer": build_config(tokenizer_cfg, args, **tok),
        }
    elif args.command == "worker":
        configs = {"worker": build_config(worker_cfg, args, model=args.model_tag)}
    else:
        cls = {"gateway": gateway_cfg, "scheduler": scheduler_cfg, "tokenizer": tokenizer_cfg}
        configs = {args.command: build_config(cls[args.command], args)}
    out = {
        name: {**address, **{k: v for k, v in dataclasses.asdict(c).items() if k != "api_key"}}
        for name, c in configs.items()
    }
    print(json.dumps(out, indent=2, sort_keys=True, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
