"""Shared fixtures: tiny chat models built offline, once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_qwen_path(tmp_path_factory):
    """Folder of a 4-layer Qwen2 chat model with random weights (hidden 128, head_dim 32)."""
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", TinyModelSpec(family="qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """Folder of a 3-layer Llama chat model with random weights (hidden 128, head_dim 32)."""
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(family="llama", num_hidden_layers=3, seed=1)
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", spec)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_qwen_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen_path)
