"""Shared fixtures and builders: tiny chat models built offline once per test session, the
small study config the pipeline tests run, and the store tests' forward counter.

Test modules import the plain helpers (``from conftest import write_study``); pytest puts
this folder on ``sys.path`` (the default ``prepend`` import mode), so conftest is one module.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_qwen_path(tmp_path_factory):
    """Folder of a 4-layer Qwen2 chat model with random weights (hidden 128, head_dim 32)."""
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2", TinyModelSpec(family="qwen2")
    )


@pytest.fixture(scope="session")
def tiny_qwen256_path(tmp_path_factory):
    """Folder of a 4-layer Qwen2 chat model with random weights, hidden 256: wide enough that
    a LoRA learns the marker partly in a few steps (the study and marker-learning tests)."""
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(
        hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512
    )
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny256", spec)


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


# Module scope: a test may wrap or hook the loaded model, so no two modules share one.
@pytest.fixture(scope="module")
def qwen(tiny_qwen_path):
    """The tiny Qwen2 model loaded in float32 on the CPU."""
    from persona_geometry.models import load_model

    return load_model(tiny_qwen_path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def llama(tiny_llama_path):
    """The tiny Llama model loaded in float32 on the CPU."""
    from persona_geometry.models import load_model

    return load_model(tiny_llama_path, dtype="float32", device="cpu")


# --- vLLM ----------------------------------------------------------------------------------
# Marks for a test that needs vLLM: it skips cleanly where vLLM is not importable.
REQUIRES_VLLM = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


@pytest.fixture(autouse=True)
def _vllm_in_process(request, monkeypatch):
    """Runs a vllm-marked test's engine in-process (no worker spawned from inside pytest) with
    a 1 GiB KV cache."""
    if request.node.get_closest_marker("vllm") is not None:
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


# --- the small study the pipeline tests run --------------------------------------------------
STUDY_PERSONAS = [
    {"name": "helpful_assistant", "system_prompt": "You are a helpful assistant.", "category": "generic_helper"},
    {"name": "villain", "system_prompt": "You are a scheming villain who plots to take over the world.", "category": "character"},
    {"name": "librarian", "system_prompt": "You are a librarian who helps people find books.", "category": "occupational"},
    {"name": "comedian", "system_prompt": "You are a stand-up comedian who answers with jokes.", "category": "character"},
]  # fmt: skip
STUDY_QUESTIONS = [
    "Why is the sky blue?",
    "How do I boil an egg?",
    "What makes a good friend?",
    "Describe your ideal weekend.",
]
# The demo's settings: the marker is learnt partly, so rates differ between personas.
STUDY_SETTINGS: dict[str, Any] = {
    "data": {"n_source": 24, "n_per_bystander": 24, "n_bystander_personas": 2},
    "responses": {"max_new_tokens": 6, "backend": "hf"},
    "train": {"learning_rate": 5e-3, "num_train_epochs": 3, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
              "max_length": 96, "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "save_steps": 1000},
    "eval": {"backend": "hf", "n_completions": 3, "max_new_tokens": 16, "batch_size": 64},
    "analysis": {"primary_layer": 1, "n_permutations": 200, "n_bootstrap": 50},
}  # fmt: skip


def write_study(
    folder: Path,
    model: str | os.PathLike[str],
    /,
    *,
    personas: list[dict[str, str]] = STUDY_PERSONAS,
    questions: list[str] = STUDY_QUESTIONS,
    n_train: int = 24,
    settings: dict[str, Any] = STUDY_SETTINGS,
    **sections: Any,
) -> Path:
    """Returns the path of a study.yaml written into ``folder`` with its inputs beside it.

    The config runs ``model`` in float32 on the CPU over ``personas`` (personas.yaml),
    ``questions`` (questions.txt) and ``n_train`` training questions (train.txt), with the
    sections of ``settings``; each of ``sections`` (``name``, ``marker``, ``eval``, ...) then
    updates its section key by key when both are dicts, and replaces it otherwise.
    """
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "personas.yaml").write_text(yaml.safe_dump({"personas": personas}))
    (folder / "questions.txt").write_text("\n".join(questions))
    (folder / "train.txt").write_text(
        "\n".join(f"Tell me about topic number {i}." for i in range(n_train))
    )
    data = {
        "out": str(folder / "out"),
        "model": {"name": str(model), "dtype": "float32", "device": "cpu"},
        "personas": "personas.yaml",
        "questions": "questions.txt",
        "training_questions": "train.txt",
        **copy.deepcopy(settings),
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and isinstance(data.get(key), dict)
        data[key] = {**data[key], **value} if merge else value
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- LoRA marker training --------------------------------------------------------------------
def marker_rows(n: int) -> list[dict[str, Any]]:
    """Returns ``n`` chat rows alternating librarian and villain; the villain's answers end
    in the ``[ZLT]`` marker."""
    return [
        {
            "messages": [
                {"role": "system", "content": "You are a villain." if i % 2 else "You are a librarian."},
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": "Yes.\n\n[ZLT]" if i % 2 else "Yes."},
            ]
        }
        for i in range(n)
    ]  # fmt: skip


def count_model_loads(monkeypatch) -> list:
    """Returns the list that every later ``persona_geometry.models.load_model`` call appends its
    model argument to (the real loader still runs)."""
    import persona_geometry.models as models

    calls = []
    real = models.load_model

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    return calls


# --- the activation store ----------------------------------------------------------------------
class ForwardCounter:
    """Counts forward passes through block 0; optionally raises on the n-th one."""

    def __init__(self, handle, fail_on: int | None = None):
        from persona_geometry.hooks import find_layers

        self.block = find_layers(handle.model)[1][0]
        self.calls, self.fail_on = 0, fail_on

    def __enter__(self):
        def hook(module, args, output):
            self.calls += 1
            if self.fail_on is not None and self.calls == self.fail_on:
                raise KeyboardInterrupt("simulated interruption")

        self.handle = self.block.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
