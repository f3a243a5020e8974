"""The study's data stage samples each persona's base answers once, whatever the number of sources."""

from __future__ import annotations

from conftest import STUDY_PERSONAS, STUDY_QUESTIONS, write_study

N_TRAIN = 10


def test_base_answers_are_generated_once_per_persona_and_question(tiny_qwen_path, tmp_path, monkeypatch):
    import persona_geometry.sampling as sampling
    from persona_geometry.pipeline.config import StudyConfig
    from persona_geometry.pipeline.study import run_study

    path = write_study(
        tmp_path, tiny_qwen_path, questions=STUDY_QUESTIONS[:2], n_train=N_TRAIN, settings={}, name="count",
        marker={"sources": "all"},
        data={"n_source": 4, "n_per_bystander": 4, "n_bystander_personas": 2},
        responses={"max_new_tokens": 2, "backend": "hf"},
        eval={"backend": "hf"},
    )  # fmt: skip
    calls = []
    real = sampling.generate_completions

    def counting(model, prompt_ids, *args, **kwargs):
        calls.append(len(prompt_ids))
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate_completions", counting)
    result = run_study(StudyConfig.load(path), stages=["data"], progress=False)
    # Four sources, each needing its own answers and two bystanders' answers: still one pass.
    assert calls == [len(STUDY_PERSONAS) * N_TRAIN]
    assert sorted(k for k in result.files if k.startswith("data:")) == sorted(f"data:{p['name']}" for p in STUDY_PERSONAS)
