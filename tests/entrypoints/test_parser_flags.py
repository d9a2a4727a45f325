"""--enable-auto-tool-choice, --tool-call-parser and --reasoning-parser: vLLM's names, refused
at start with exit 2 when they cannot work, and handed unchanged to the gateway process."""

from __future__ import annotations

import pytest

from splitserve.entrypoints.cli import build_parser, main
from splitserve.entrypoints.config_cli import build_config, config_to_argv
from splitserve.gateway.config import GatewayConfig

FLAGS = [
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "llama3_json",
    "--reasoning-parser",
    "deepseek_r1",
]


def test_serve_hands_the_parsers_to_its_gateway():
    cfg = build_config(GatewayConfig, build_parser().parse_args(["serve", "/m", *FLAGS]))
    assert (cfg.enable_auto_tool_choice, cfg.tool_call_parser, cfg.reasoning_parser) == (
        True,
        "llama3_json",
        "deepseek_r1",
    )
    child_args = build_parser().parse_args(["gateway", *config_to_argv(cfg, skip={"api_key"})])
    assert build_config(GatewayConfig, child_args) == cfg
    default = build_config(GatewayConfig, build_parser().parse_args(["gateway"]))
    assert (default.enable_auto_tool_choice, default.tool_call_parser) == (False, None)
    assert default.reasoning_parser is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser NAME"),
        (
            ["--enable-auto-tool-choice", "--tool-call-parser", "hermes2"],
            "'hermes2' is not a known parser; known: hermes, llama3_json, mistral",
        ),
        (["--tool-call-parser", "hermes"], "only with --enable-auto-tool-choice"),
        (["--reasoning-parser", "r1"], "'r1' is not a known parser; known: deepseek_r1, qwen3"),
    ],
)
def test_serve_refuses_bad_parser_flags_at_start(tmp_path, capsys, flags, message):
    assert main(["serve", str(tmp_path / "no-model"), *flags]) == 2
    assert message in capsys.readouterr().err
