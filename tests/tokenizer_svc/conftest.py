"""Tokenizer folders trained locally (no hub) and loaded handles, shared by the session."""

from __future__ import annotations

import pytest

from splitserve.testing.demo_model import BOS_TEMPLATE, build_tokenizer
from splitserve.tokenizer_svc.tokenizer import TokenizerHandle

from .utils import load


@pytest.fixture(scope="session")
def chatml_dir(tmp_path_factory):
    """Byte-level BPE with the ChatML template; no BOS added by the tokenizer."""
    return build_tokenizer(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="session")
def bos_dir(tmp_path_factory):
    """Adds BOS when asked to, and has a template that writes BOS itself."""
    return build_tokenizer(tmp_path_factory.mktemp("bos"), chat_template=BOS_TEMPLATE, add_bos=True)


@pytest.fixture(scope="session")
def no_template_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("no_template"), chat_template=None)


@pytest.fixture(scope="session")
def byt5_dir(tmp_path_factory):
    """A tokenizer transformers 5 loads only as a Python (slow) tokenizer."""
    from transformers import ByT5Tokenizer

    path = tmp_path_factory.mktemp("byt5")
    ByT5Tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def handle(chatml_dir) -> TokenizerHandle:
    return load(chatml_dir)


@pytest.fixture(scope="session")
def bos_handle(bos_dir) -> TokenizerHandle:
    return load(bos_dir)
