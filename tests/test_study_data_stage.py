"""The study's data stage samples each persona's base answers once, whatever the number of sources."""

from __future__ import annotations

import yaml

PERSONAS = [
    {"name": "helpful_assistant", "system_prompt": "You are a helpful assistant.", "category": "generic_helper"},
    {"name": "villain", "system_prompt": "You are a scheming villain.", "category": "character"},
    {"name": "librarian", "system_prompt": "You are a librarian.", "category": "occupational"},
    {"name": "comedian", "system_prompt": "You are a stand-up comedian.", "category": "character"},
]
N_TRAIN = 10


def test_base_answers_are_generated_once_per_persona_and_question(tiny_qwen_path, tmp_path, monkeypatch):
    import persona_geometry.sampling as sampling
    from persona_geometry.pipeline.config import StudyConfig
    from persona_geometry.pipeline.study import run_study

    (tmp_path / "personas.yaml").write_text(yaml.safe_dump({"personas": PERSONAS}))
    (tmp_path / "questions.txt").write_text("Why is the sky blue?\nHow do I boil an egg?")
    (tmp_path / "train.txt").write_text("\n".join(f"Tell me about topic {i}." for i in range(N_TRAIN)))
    config = {
        "name": "count",
        "out": str(tmp_path / "out"),
        "model": {"name": str(tiny_qwen_path), "dtype": "float32", "device": "cpu"},
        "personas": "personas.yaml",
        "questions": "questions.txt",
        "training_questions": "train.txt",
        "marker": {"sources": "all"},
        "data": {"n_source": 4, "n_per_bystander": 4, "n_bystander_personas": 2},
        "responses": {"max_new_tokens": 2, "backend": "hf"},
        "eval": {"backend": "hf"},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    calls = []
    real = sampling.generate_completions

    def counting(model, prompt_ids, *args, **kwargs):
        calls.append(len(prompt_ids))
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate_completions", counting)
    result = run_study(StudyConfig.load(tmp_path / "study.yaml"), stages=["data"], progress=False)
    # Four sources, each needing its own answers and two bystanders' answers: still one pass.
    assert calls == [len(PERSONAS) * N_TRAIN]
    assert sorted(k for k in result.files if k.startswith("data:")) == sorted(f"data:{p['name']}" for p in PERSONAS)
