"""WorkerConfig validation: every bad value is named in the error."""

from __future__ import annotations

import dataclasses

import pytest

from splitserve.worker.config import WorkerConfig


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "dtype",
            "float64",
            "dtype must be one of auto, float32, bfloat16, float16, got 'float64'",
        ),
        ("device", "tpu", "got 'tpu'"),
        ("load_format", "gguf", "got 'gguf'"),
        ("attention_backend", "flash", "got 'flash'"),
        ("pipeline_parallel_size", 0, "pipeline_parallel_size must be at least 1, got 0"),
        ("rank", 2, r"rank must be in \[0, 1\), got 2"),
        ("max_model_len", 0, "max_model_len must be at least 1, got 0"),
        ("kv_cache_memory", -5, "kv_cache_memory must be positive, got -5"),
        ("gpu_memory_utilization", 1.5, r"gpu_memory_utilization must be in \(0, 1\], got 1.5"),
        ("max_num_seqs", 0, "max_num_seqs must be at least 1, got 0"),
        ("max_num_batched_tokens", 0, "max_num_batched_tokens must be at least 1, got 0"),
        ("max_logprobs", -1, "max_logprobs must be non-negative, got -1"),
        ("max_seq_len_to_capture", 0, "max_seq_len_to_capture must be at least 1, got 0"),
        (
            "max_cudagraph_capture_size",
            -1,
            "max_cudagraph_capture_size must be non-negative, got -1",
        ),
        ("cuda_graph_sizes", [4, 0], r"cuda_graph_sizes must be positive integers, got \[4, 0\]"),
        ("cuda_graph_sizes", ["8", "x"], "cuda_graph_sizes must be positive integers, got .*'x'"),
    ],
)
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        WorkerConfig(model="m", **{field: value})


def test_every_field_has_a_default_and_a_docstring():
    # The engine fields' docstrings are where they are declared (common/engine_config.py).
    from splitserve.entrypoints.config_cli import field_docs

    documented = {name for name, doc in field_docs(WorkerConfig).items() if doc}
    for field in dataclasses.fields(WorkerConfig):
        assert field.default is not dataclasses.MISSING, field.name
        assert field.name in documented, field.name
    assert WorkerConfig(model="m", rank=1, pipeline_parallel_size=2).is_last_rank


def test_cuda_graph_sizes_from_the_command_line():
    """The generated CLI passes list flags as strings; the config stores ints."""
    import argparse

    from splitserve.entrypoints.config_cli import add_config_flags, build_config

    parser = argparse.ArgumentParser()
    add_config_flags(parser, WorkerConfig)
    args = parser.parse_args(["--cuda-graph-sizes", "1", "8", "--max-cudagraph-capture-size", "64"])
    config = build_config(WorkerConfig, args, model="m")
    assert config.cuda_graph_sizes == [1, 8] and config.max_cudagraph_capture_size == 64
    assert config.max_seq_len_to_capture == 8192 and config.enforce_eager is False
    help_text = parser.format_help()
    assert "--max-seq-len-to-capture" in help_text and "CUDA only" in help_text
