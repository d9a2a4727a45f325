"""--structured-outputs-config (vLLM's JSON) mapped onto the tokenizer service's flags."""

from __future__ import annotations

import json

import pytest

from splitserve.entrypoints.cli import main
from splitserve.entrypoints.config_cli import config_to_argv
from splitserve.tokenizer_svc.config import TokenizerServiceConfig


def _cfg(**kw) -> TokenizerServiceConfig:
    return TokenizerServiceConfig(tokenizer="t", **kw)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance", "auto"])
def test_backend_sets_guided_decoding_backend(backend):
    cfg = _cfg(structured_outputs_config=json.dumps({"backend": backend}))
    assert cfg.guided_decoding_backend == backend
    # A child process rebuilt from the flags gets the same backend.
    args = config_to_argv(cfg)
    assert "--structured-outputs-config" in args


def test_accepted_defaults_and_fallback():
    cfg = _cfg(
        structured_outputs_config={
            "backend": "guidance",
            "disable_fallback": True,
            "disable_any_whitespace": False,
            "reasoning_parser": "",
        }
    )
    assert cfg.guided_decoding_backend == "guidance"
    assert _cfg(structured_outputs_config="{}").guided_decoding_backend == "auto"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"backend": "outlines"}, "backend='outlines': splitserve has xgrammar, guidance, auto"),
        ({"backend": "auto", "disable_fallback": True}, "needs a named backend"),
        ({"disable_any_whitespace": True}, "whitespace_pattern"),
        ({"disable_additional_properties": True}, "per request"),
        ({"reasoning_parser": "deepseek_r1"}, "--reasoning-parser"),
        ({"enable_in_reasoning": True}, "enable_in_reasoning=True"),
        ({"bogus": 1}, "unknown key(s) bogus"),
        ([1], "must be a JSON object"),
        ("{", "is not JSON"),
    ],
)
def test_refused(value, message):
    text = value if isinstance(value, str) else json.dumps(value)
    with pytest.raises(ValueError) as exc:
        _cfg(structured_outputs_config=text)
    assert message in str(exc.value)


def test_contradicting_backend_flag():
    with pytest.raises(ValueError, match="contradicts --guided-decoding-backend guidance"):
        _cfg(guided_decoding_backend="guidance", structured_outputs_config='{"backend": "auto"}')
    ok = _cfg(
        guided_decoding_backend="guidance", structured_outputs_config='{"backend": "guidance"}'
    )
    assert ok.guided_decoding_backend == "guidance"


def test_serve_flag(capsys):
    argv = ["serve", "--structured-outputs-config", '{"backend": "guidance"}', "--check-config"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokenizer"]["guided_decoding_backend"] == "guidance"
    assert main(["serve", "--structured-outputs-config", '{"x": 1}', "--check-config"]) == 2
    assert "--structured-outputs-config: unknown key(s) x" in capsys.readouterr().err


def test_default_backend_is_auto_in_both_services(capsys):
    """vLLM's default; the tokenizer service and the sampling rank (which compiles a direct
    Generate caller's constraint) must agree on it."""
    assert main(["serve", "--check-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokenizer"]["guided_decoding_backend"] == "auto"
    assert out["worker"]["guided_decoding_backend"] == "auto"
    argv = ["serve", "--guided-decoding-backend", "xgrammar", "--check-config"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokenizer"]["guided_decoding_backend"] == "xgrammar"
    assert out["worker"]["guided_decoding_backend"] == "xgrammar"
