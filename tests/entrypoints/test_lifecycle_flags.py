"""The lifecycle flags reach the gateway the same way through `serve` and `gateway`:
--drain-timeout-s (SIGTERM drain, row 21) and --request-timeout-s (gRPC deadline, row 18)."""

from __future__ import annotations

import pytest

from splitserve.entrypoints.cli import build_parser
from splitserve.entrypoints.config_cli import build_config, config_to_argv
from splitserve.gateway.config import GatewayConfig

FLAGS = ["--drain-timeout-s", "5", "--request-timeout-s", "2.5"]


def test_serve_passes_the_timeouts_to_its_gateway_process():
    serve_args = build_parser().parse_args(["serve", "/m", *FLAGS])
    cfg = build_config(GatewayConfig, serve_args)
    assert (cfg.drain_timeout_s, cfg.request_timeout_s) == (5.0, 2.5)
    # What the launcher hands the gateway child parses back to the same values.
    child_args = build_parser().parse_args(["gateway", *config_to_argv(cfg, skip={"api_key"})])
    child = build_config(GatewayConfig, child_args)
    assert (child.drain_timeout_s, child.request_timeout_s) == (5.0, 2.5)


def test_defaults_and_checks():
    cfg = build_config(GatewayConfig, build_parser().parse_args(["gateway"]))
    assert cfg.drain_timeout_s == 30.0 and cfg.request_timeout_s is None
    with pytest.raises(ValueError, match="drain_timeout_s must be non-negative, got -1"):
        build_config(
            GatewayConfig, build_parser().parse_args(["gateway", "--drain-timeout-s", "-1"])
        )
