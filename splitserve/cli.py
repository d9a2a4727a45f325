"""`splitserve serve|gateway|scheduler|worker|tokenizer`: the whole stack, or one service."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys

from splitserve import __version__
from splitserve.config_cli import add_config_flags, build_config
from splitserve.tracing import setup_tracing

logger = logging.getLogger("splitserve")

# Fields the launcher sets itself (addresses of the processes it starts).
_WIRING = {"worker_addresses", "rank"}


def _configs():
    from splitserve.gateway.config import GatewayConfig
    from splitserve.scheduler.config import SchedulerConfig
    from splitserve.tokenizer_svc.config import TokenizerServiceConfig
    from splitserve.worker.config import WorkerConfig

    return GatewayConfig, SchedulerConfig, WorkerConfig, TokenizerServiceConfig


def _model_arg(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "model_tag",
        nargs=None if required else "?",
        metavar="MODEL",
        help="model folder or Hugging Face hub id"
        + ("" if required else " (default: the built-in demo model)"),
    )


def build_parser() -> argparse.ArgumentParser:
    gateway_cfg, scheduler_cfg, worker_cfg, tokenizer_cfg = _configs()
    parser = argparse.ArgumentParser(
        prog="splitserve", description="OpenAI-compatible LLM server split into gRPC services"
    )
    parser.add_argument("--version", action="version", version=f"splitserve {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("SPLITSERVE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = {
        "action": "store_true",
        "help": "parse and validate the configuration, print it as JSON and exit 0 "
        "without starting anything",
    }

    p = sub.add_parser("serve", help="start every service as its own process")
    p.add_argument("--check-config", **check)
    _model_arg(p, required=False)
    add_config_flags(
        p, gateway_cfg, scheduler_cfg, worker_cfg, tokenizer_cfg, skip=_WIRING | {"model"}
    )
    p.add_argument(
        "--log-level",
        dest="log_level",
        default=argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
    )

    p = sub.add_parser("gateway", help="the OpenAI HTTP gateway alone")
    p.add_argument("--check-config", **check)
    add_config_flags(p, gateway_cfg)

    p = sub.add_parser("scheduler", help="the scheduler alone")
    p.add_argument("--check-config", **check)
    p.add_argument("--address", default="127.0.0.1:50052", help="where to listen")
    add_config_flags(p, scheduler_cfg)

    p = sub.add_parser("worker", help="one pipeline rank alone")
    p.add_argument("--check-config", **check)
    _model_arg(p, required=True)
    p.add_argument("--address", default="127.0.0.1:50053", help="where to listen")
    add_config_flags(p, worker_cfg, skip={"model"})

    p = sub.add_parser("tokenizer", help="the tokenizer service alone")
    p.add_argument("--check-config", **check)
    p.add_argument("--address", default="127.0.0.1:50051", help="where to listen")
    add_config_flags(p, tokenizer_cfg)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{args.command}] %(name)s: %(message)s",
    )
    gateway_cfg, scheduler_cfg, worker_cfg, tokenizer_cfg = _configs()
    try:
        if args.check_config:
            return _check_config(args)
        if args.command == "serve":
            from splitserve.launcher import serve

            return serve(args)
        if args.command == "gateway":
            from splitserve.gateway.server import run_gateway

            config = build_config(gateway_cfg, args)
            setup_tracing("splitserve-gateway", config.otlp_traces_endpoint)
            asyncio.run(run_gateway(config))
            return 0
        if args.command == "scheduler":
            from splitserve.scheduler.server import run_scheduler

            config = build_config(scheduler_cfg, args)
            setup_tracing("splitserve-scheduler", config.otlp_traces_endpoint)
            return asyncio.run(run_scheduler(config, args.address))
        if args.command == "worker":
            from splitserve.worker.server import run_worker

            config = build_config(worker_cfg, args, model=args.model_tag)
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


def _check_config(args: argparse.Namespace) -> int:
    """`--check-config`: build every config the command would use, print them, start nothing."""
    gateway_cfg, scheduler_cfg, worker_cfg, tokenizer_cfg = _configs()
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
