"""splitserve.common.engine_config (no torch): one declaration of the engine fields, and the
rule by which services agree on them."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from splitserve.common.engine_config import (
    FIELDS,
    EngineConfig,
    EngineConfigConflict,
    EngineValues,
    agree,
    engine_values,
    from_proto,
    to_proto,
)
from splitserve.entrypoints.config_cli import (
    add_config_flags,
    build_config,
    config_to_argv,
    field_docs,
)
from splitserve.gateway.config import GatewayConfig
from splitserve.scheduler.config import SchedulerConfig
from splitserve.worker.config import WorkerConfig

CONFIGS = (GatewayConfig, SchedulerConfig, WorkerConfig)


def side(source: str, fixed: set[str] = frozenset(), **values) -> EngineValues:
    return EngineValues(values, frozenset(fixed), dict.fromkeys(values, source))


@pytest.mark.parametrize("cls", CONFIGS)
def test_service_configs_take_the_one_declaration(cls):
    engine_docs = field_docs(EngineConfig)
    docs = field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert cls.ENGINE_FIELDS
    for name in cls.ENGINE_FIELDS:
        assert fields[name].default == FIELDS[name].default, name
        assert docs[name] == engine_docs[name] and docs[name], name


def test_scheduler_and_worker_no_longer_drift():
    # The issue: 2048 in the scheduler, 8192 in the worker.
    assert SchedulerConfig().max_num_batched_tokens == WorkerConfig().max_num_batched_tokens
    assert WorkerConfig().max_num_batched_tokens == 2048


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be at least 1, got 0"),
        ({"max_num_seqs": -3}, "max_num_seqs must be at least 1, got -3"),
        ({"max_model_len": 0}, "max_model_len must be at least 1, got 0"),
        ({"max_logprobs": -1}, "max_logprobs must be non-negative, got -1"),
        ({"max_loras": 0}, "max_loras must be at least 1, got 0"),
    ],
)
def test_bad_values_are_named_in_every_config_that_takes_them(kwargs, message):
    (name,) = kwargs
    for cls in (EngineConfig, *CONFIGS):
        if cls is EngineConfig or name in cls.ENGINE_FIELDS:
            with pytest.raises(ValueError, match=message):
                cls(**kwargs)


def test_a_fixed_value_replaces_a_default_either_way():
    sched = side("scheduler", max_num_batched_tokens=2048, max_num_seqs=64)
    worker = side("worker rank 0", {"max_num_batched_tokens"}, max_num_batched_tokens=8192)
    got = agree(sched, worker)
    assert got.values == {"max_num_batched_tokens": 8192, "max_num_seqs": 64}
    assert got.sources["max_num_batched_tokens"] == "worker rank 0"
    assert got.fixed == {"max_num_batched_tokens"}
    # The other way round: the side with the default takes the fixed value too.
    assert agree(worker, sched).values["max_num_batched_tokens"] == 8192


def test_two_fixed_values_are_refused_naming_both():
    sched = side("scheduler", {"max_num_batched_tokens"}, max_num_batched_tokens=2048)
    worker = side("worker rank 0", {"max_num_batched_tokens"}, max_num_batched_tokens=8192)
    with pytest.raises(EngineConfigConflict) as err:
        agree(sched, worker)
    assert str(err.value).startswith("max_num_batched_tokens: scheduler 2048, worker rank 0 8192")
    assert "--max-num-batched-tokens" in str(err.value) and "\n" not in str(err.value)


def test_a_value_taken_from_one_rank_binds_the_next():
    sched = side("scheduler", max_num_seqs=256)
    rank0 = side("worker rank 0", {"max_num_seqs"}, max_num_seqs=128)
    rank1 = side("worker rank 1", {"max_num_seqs"}, max_num_seqs=256)
    with pytest.raises(
        EngineConfigConflict, match="max_num_seqs: worker rank 0 128, worker rank 1 256"
    ):
        agree(agree(sched, rank0), rank1)


def test_fields_one_side_does_not_take_are_carried_over():
    gateway = side("gateway", {"max_logprobs"}, max_logprobs=5)
    engine = side("scheduler", {"max_lora_rank"}, max_lora_rank=64)
    got = agree(gateway, engine)
    assert got.values == {"max_logprobs": 5, "max_lora_rank": 64}


def test_proto_round_trip_keeps_values_fixed_fields_and_none():
    values = engine_values(SchedulerConfig(max_num_seqs=8), "scheduler")
    assert values.values["max_model_len"] is None and values.fixed == {"max_num_seqs"}
    back = from_proto(to_proto(values), "scheduler")
    assert back == values
    empty = from_proto(to_proto(side("x")), "x")
    assert empty.values == {} and empty.fixed == frozenset()


def _parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, cls)
    return build_config(cls, parser.parse_args(argv))


def test_a_flag_given_at_its_default_is_fixed_and_passed_on():
    given = _parse(SchedulerConfig, ["--max-num-batched-tokens", "2048"])
    assert engine_values(given, "scheduler").fixed == {"max_num_batched_tokens"}
    # The launcher passes it to the child, so the child holds it fixed too.
    assert config_to_argv(given) == ["--max-num-batched-tokens", "2048"]
    child = _parse(SchedulerConfig, config_to_argv(given))
    assert child.explicit_engine_fields == {"max_num_batched_tokens"}
    default = _parse(SchedulerConfig, [])
    assert engine_values(default, "scheduler").fixed == frozenset()
    assert config_to_argv(default) == []


def test_none_max_model_len_is_never_fixed():
    # compose passes `--max-model-len none` to the scheduler and the workers alike.
    none = _parse(SchedulerConfig, ["--max-model-len", "none"])
    assert engine_values(none, "scheduler").fixed == frozenset()
    worker = side("worker rank 0", {"max_model_len"}, max_model_len=512)
    assert agree(engine_values(none, "scheduler"), worker).values["max_model_len"] == 512
    assert (
        from_proto(to_proto(side("w", {"max_model_len"}, max_model_len=None)), "w").fixed == set()
    )
