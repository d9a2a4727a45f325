"""The gateway's engine fields against the ones the scheduler reports in ModelInfo.engine."""

from __future__ import annotations

import argparse

import pytest

from splitserve.common.engine_config import EngineConfigConflict, EngineValues, to_proto
from splitserve.entrypoints.config_cli import add_config_flags, build_config
from splitserve.gateway.config import GatewayConfig


def _engine(**values):
    return to_proto(EngineValues(values, frozenset(values), dict.fromkeys(values, "scheduler")))


def _gateway(*argv: str) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, GatewayConfig)
    return build_config(GatewayConfig, parser.parse_args(list(argv)))


def test_a_gateway_default_takes_the_engines_value():
    config = _gateway()
    config.agree_with_engine(_engine(max_logprobs=5, max_num_seqs=64))
    assert config.max_logprobs == 5


def test_a_flag_given_to_the_gateway_must_match_even_at_its_default():
    config = _gateway("--max-logprobs", "20")
    with pytest.raises(EngineConfigConflict, match="max_logprobs: gateway 20, scheduler 5"):
        config.agree_with_engine(_engine(max_logprobs=5))


def test_lora_fields_shape_the_gateway_at_start_so_they_must_match():
    with pytest.raises(EngineConfigConflict, match="enable_lora: gateway False, scheduler True"):
        _gateway().agree_with_engine(_engine(enable_lora=True))
    with pytest.raises(EngineConfigConflict, match="max_lora_rank: gateway 16, scheduler 64"):
        _gateway().agree_with_engine(_engine(max_lora_rank=64))


def test_a_scheduler_that_states_no_engine_fields_changes_nothing():
    config = _gateway("--max-logprobs", "7")
    config.agree_with_engine(_engine())
    assert config.max_logprobs == 7
