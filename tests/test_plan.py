"""The study plan: every check before GPU time, and estimates computed from the config alone."""

from __future__ import annotations

import importlib.util

import pytest

from persona_geometry.pipeline.config import StudyConfig
from persona_geometry.pipeline.plan import plan_study
from persona_geometry.pipeline.study import run_study


def _config(tmp_path, model_path, **sections):
    data = {
        "name": "plan",
        "out": str(tmp_path / "out"),
        "model": {"name": str(model_path), "dtype": "float32", "device": "cpu"},
        "eval": {"backend": "hf", "n_completions": 2, "max_new_tokens": 8, "batch_size": 16},
        "responses": {"max_new_tokens": 6, "backend": "hf"},
        "data": {"n_source": 10, "n_per_bystander": 5},
        "train": {"max_length": 64, "num_train_epochs": 2},
        "analysis": {"primary_layer": 2},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return StudyConfig.from_dict(data)


def test_plan_counts_prompts_tokens_parameters_and_units_independently(tiny_qwen_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import persona_geometry as pg

    config = _config(tmp_path, tiny_qwen_path, marker={"sources": ["villain", "librarian", "comedian"], "seeds": [1, 2]})
    plan = plan_study(config)
    # Parameters: the real checkpoint's tensors, loaded with its weights.
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path)
    assert plan.n_parameters == sum(p.numel() for p in model.parameters())
    assert (plan.n_layers, plan.d_model, plan.layers) == (4, 128, (0, 1, 2, 3))
    # Tokens: every persona × question prompt through the tokenizer's own chat template.
    tok = AutoTokenizer.from_pretrained(tiny_qwen_path)
    personas, questions = pg.builtin_personas(), pg.builtin_questions()
    tokens = sum(
        len(tok.apply_chat_template([{"role": "system", "content": p.system_prompt}, {"role": "user", "content": q}], tokenize=True, add_generation_prompt=True, return_dict=False))
        for p in personas
        for q in questions
    )
    stages = {s.stage: s for s in plan.stages}
    assert list(stages) == ["extract", "data", "train", "eval", "sweep", "report"]
    assert stages["extract"].tokens == tokens and stages["extract"].flops == 2.0 * plan.n_parameters * tokens
    assert stages["train"].units == 6 and stages["eval"].units == 6
    assert f"{len(personas) * len(questions)} prompts" in stages["extract"].work
    assert f"{len(personas) * len(questions) * 2} completions" in stages["eval"].work
    assert "20 rows × 2 epochs" in stages["train"].work  # 10 source rows + 2 bystanders × 5
    text = plan.summary()
    assert "nothing loaded, nothing written" in text and "assumed 0.1 TFLOP/s" in text
    assert not (tmp_path / "out").exists()


def test_two_sources_fail_before_anything_is_trained_or_written(tiny_qwen_path, tmp_path):
    config = _config(tmp_path, tiny_qwen_path, marker={"sources": ["villain", "librarian"]})
    with pytest.raises(ValueError, match="at least 3 personas, and marker.sources gives 2"):
        run_study(config, progress=False)
    assert not (tmp_path / "out").exists()
    # Without the sweep and report, two sources are a valid study.
    assert [s.stage for s in plan_study(config, stages=["extract", "data", "train", "eval"]).stages] == ["extract", "data", "train", "eval"]


def test_a_model_missing_from_the_cache_fails_before_the_output_folder_exists(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from persona_geometry.pipeline.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path = tmp_path / "study.yaml"
    path.write_text(f"model: {{name: Qwen/Qwen2.5-7B-Instruct}}\nout: {tmp_path / 'out'}\n")
    with pytest.raises(ValueError, match=r"'Qwen/Qwen2.5-7B-Instruct' is not in the local Hugging Face cache .*hf download"):
        run_study(StudyConfig.load(path), progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["run", str(path)]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"extract": {"layers": [0, 2, 9]}}, r"'extract.layers' must be block indices in \[-4, 3\] \(.* has 4 blocks\)\. Got 9 instead"),
        ({"analysis": {"primary_layer": 7}}, r"'analysis.primary_layer' must be block indices in \[-4, 3\] \(.* has 4 blocks\)\. Got 7 instead"),
        ({"analysis": {"holdout": ["villain"]}, "marker": {"sources": ["villain", "librarian", "comedian"]}}, "leaves 2 personas to fit"),
        ({"figures": {"grid_layers": [5]}}, "figures.grid_layers names layer 5"),
        ({"model": {"chat_template": "missing-template.jinja"}}, "missing-template.jinja"),
    ],
)
def test_bad_settings_fail_in_one_line(tiny_qwen_path, tmp_path, sections, message):
    config = _config(tmp_path, tiny_qwen_path, **sections)
    with pytest.raises(ValueError, match=message) as info:
        plan_study(config)
    assert "\n" not in str(info.value)


def test_a_missing_back_end_and_an_unwritable_output_fail_early(tiny_qwen_path, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ValueError, match="'vllm' extra"):
            plan_study(_config(tmp_path, tiny_qwen_path, eval={"backend": "vllm"}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        plan_study(_config(tmp_path, tiny_qwen_path, out=str(tmp_path / "file")))
    with pytest.raises(ValueError, match="is not a writable folder"):
        plan_study(_config(tmp_path, tiny_qwen_path, out=str(tmp_path / "file" / "sub")))


def test_sweep_and_report_alone_need_no_model(tmp_path):
    config = StudyConfig.from_dict({"model": {"name": "not-a-cached/model"}, "out": str(tmp_path / "out")})
    plan = plan_study(config, stages=["sweep", "report"])
    assert plan.model_folder is None and [s.stage for s in plan.stages] == ["sweep", "report"]
    assert "not loaded by these stages" in plan.summary()
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        plan_study(config, stages=["extract"])


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tiny_qwen_path, tmp_path, capsys):
    import yaml

    from persona_geometry.pipeline.cli import main

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": str(tiny_qwen_path), "device": "cpu"}, "out": str(tmp_path / "out"),
                                    "eval": {"backend": "hf"}}))  # fmt: skip
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Plan for study" in out and "extract" in out and "240 prompts" in out and "12 adapters" in out
    assert not (tmp_path / "out").exists()
    path.write_text(yaml.safe_dump({"model": {"name": str(tiny_qwen_path)}, "out": str(tmp_path / "out"),
                                    "marker": {"sources": ["villain", "librarian"]}, "eval": {"backend": "hf"}}))  # fmt: skip
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "at least 3 personas" in capsys.readouterr().err and not (tmp_path / "out").exists()
