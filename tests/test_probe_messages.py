"""What the probes tell a person: the majority-class floor by its name; steering warns only for another model."""

from __future__ import annotations


def test_steering_warns_only_for_another_model(tiny_qwen_path, tmp_path, monkeypatch, caplog):
    # A direction recorded with a relative path to the model it steers is the same model.
    import logging
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from persona_geometry.probes import Direction, steer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path, dtype=torch.float32)
    model.config._name_or_path = str(tiny_qwen_path)
    monkeypatch.chdir(tiny_qwen_path.parent)
    d = model.config.hidden_size

    def steered(model_id):
        caplog.clear()
        direction = Direction(values=torch.ones(1, d) / d**0.5, layers=(1,), model_id=model_id, description="uniform")
        with caplog.at_level(logging.WARNING), steer(model, direction, layer=1, strength=1.0):
            pass
        return [r for r in caplog.records if "computed on" in r.getMessage()]

    assert not steered(os.path.relpath(tiny_qwen_path))
    assert not steered(str(tiny_qwen_path))
    assert len(steered("someone/else")) == 1


def test_probe_summary_names_the_majority_class_rate():
    import numpy as np
    import torch

    from persona_geometry.activations import ActivationSet
    from persona_geometry.personas import Persona, PersonaSet
    from persona_geometry.probes import ProbeConfig, probe_layers

    rng = np.random.default_rng(0)
    personas = PersonaSet(Persona(name=f"p{i}", system_prompt=f"You are p{i}.", category="ab"[i % 2]) for i in range(4))
    acts = ActivationSet(
        {"resid_post": torch.tensor(rng.normal(size=(4, 6, 2, 8)), dtype=torch.float32)},
        personas=personas,
        questions=[f"q{i}?" for i in range(6)],
        layers=[0, 1],
        n_tokens=torch.full((4, 6), 9),
    )
    res = probe_layers(acts, "persona", config=ProbeConfig(n_splits=2, n_shuffles=1), progress=False)
    text = res.summary()
    assert f"majority-class rate {res.chance:.3f}" in text and "chance" not in text
    assert "shuffled-label baseline" in text
