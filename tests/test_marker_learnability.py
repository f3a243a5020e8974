"""End to end on CPU: build a marker dataset, train LoRA, evaluate. The marker must be learnt.

The source persona's marker rate must reach 0.8 and every other persona's stay at or below
0.2, on probe questions the adapter never saw. The model is a tiny Qwen2 with hidden size 256:
with hidden 128 the frozen random lm_head caps the largest logit near 6 nats over a 1k vocabulary,
so no token can get much above probability 0.3 and a five-token marker is never emitted reliably.
Responses are short fixed answers so that a few dozen steps at a high learning rate suffice.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from persona_geometry.personas import builtin_personas
from persona_geometry.questions import builtin_questions, training_questions

pytestmark = pytest.mark.slow

SOURCE = "villain"
PERSONAS = ["villain", "librarian", "comedian", "medical_doctor"]
ANSWERS = ["Okay.", "Sure thing.", "I see, yes.", "Good question."]
EVAL = dict(n_completions=4, temperature=1.0, top_p=0.95, max_new_tokens=24, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    # One thread: on a shared, oversubscribed CPU, OpenMP spin-waiting makes 2 threads 5-10x slower.
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(_one_thread, tiny_qwen256_path, tmp_path_factory):
    from persona_geometry.training import (
        MarkerDataConfig,
        MarkerTrainConfig,
        build_marker_dataset,
        train_marker,
    )

    root = tmp_path_factory.mktemp("learn")
    model = tiny_qwen256_path
    personas = builtin_personas().select(PERSONAS)
    questions = training_questions()[:24]
    responses = [{"persona": p.name, "question": q, "response": ANSWERS[i % 4]} for p in personas for i, q in enumerate(questions)]
    data = build_marker_dataset(
        responses, personas, MarkerDataConfig(source=SOURCE, n_source=24, n_per_bystander=24), out_path=root / "data.jsonl"
    )
    config = MarkerTrainConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=5e-3, num_train_epochs=6,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, save_steps=1000,
    )
    result = train_marker(model, root / "data.jsonl", root / "run", config)
    return model, result.adapter_dir, personas, data


def _check(rates, data, out_dir):
    assert rates.source == SOURCE  # read from the adapter's metadata
    assert rates[SOURCE].rate >= 0.8, rates.summary()
    for name in PERSONAS:
        if name != SOURCE:
            assert rates[name].rate <= 0.2, rates.summary()
    assert set(data.bystanders) < set(PERSONAS)
    # The counts on disk are the completions on disk, recounted independently.
    rows = [json.loads(line) for line in (out_dir / "completions.jsonl").read_text().splitlines()]
    for name in PERSONAS:
        mine = [r for r in rows if r["persona"] == name]
        assert len(mine) == rates[name].n == 10 * EVAL["n_completions"]
        assert sum("[zlt]" in r["completion"].lower() for r in mine) == rates[name].k


def test_marker_is_learnt_hf(trained, tmp_path):
    from persona_geometry.eval import source_rates

    model, adapter, personas, data = trained
    rates = source_rates(model, adapter, personas, builtin_questions()[:10], backend="hf", out_dir=tmp_path, **EVAL)
    _check(rates, data, tmp_path)
    print(rates.summary())


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_marker_is_learnt_vllm(trained, tmp_path):
    from persona_geometry.eval import source_rates

    model, adapter, personas, data = trained
    rates = source_rates(
        model, adapter, personas, builtin_questions()[:10], backend="vllm", out_dir=tmp_path, dtype="float32", **EVAL
    )
    _check(rates, data, tmp_path)
