"""The study config: defaults are the reference study's, and bad input is one error naming the key."""

import pytest

from persona_geometry.pipeline.config import StudyConfig
from persona_geometry.pipeline.study import study_inputs


def test_defaults_are_the_reference_recipe():
    c = StudyConfig.from_dict({"model": "Qwen/Qwen2.5-7B-Instruct"})
    assert (c.train.r, c.train.lora_alpha, c.train.lora_dropout, c.train.use_rslora) == (32, 64, 0.05, True)
    assert (c.train.learning_rate, c.train.lr_scheduler_type, c.train.warmup_ratio, c.train.num_train_epochs) == (1e-5, "cosine", 0.05, 3)
    assert (c.train.per_device_train_batch_size, c.train.gradient_accumulation_steps, c.train.max_length, c.train.seed) == (4, 4, 1024, 42)
    assert (c.data.marker, c.data.n_source, c.data.n_bystander_personas, c.data.n_per_bystander) == ("[ZLT]", 200, 2, 200)
    assert (c.eval.n_completions, c.eval.temperature, c.eval.top_p, c.eval.max_new_tokens) == (5, 1.0, 0.95, 512)
    assert c.geometry.reference == "helpful_assistant" and c.extract.hooks == ("resid_post",)


def test_round_trip_through_yaml(tmp_path):
    import yaml

    c = StudyConfig.from_dict({"model": {"name": "m", "dtype": "bfloat16"}, "extract": {"layers": [3, 5], "compile_blocks": False}, "analysis": {"holdout": ["villain"]}})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(c.to_dict()))
    again = StudyConfig.load(path)
    assert again.to_dict() == c.to_dict()
    assert again.extract.layers == (3, 5) and again.analysis.holdout == ("villain",)
    assert again.extract.compile_blocks is False and StudyConfig.from_dict({"model": {"name": "m"}}).extract.compile_blocks is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "m", "train": {"lr": 1e-4}}, "Unknown key 'train.lr'"),
        ({"model": "m", "bogus": 1}, "Unknown key 'bogus'"),
        ({"model": "m", "eval": {"backend": "tgi"}}, "'backend' parameter of EvalConfig must be one of"),
        ({"model": "m", "eval": {"n_completions": 0}}, "'n_completions' parameter of SamplingSettings must be a positive int"),
        ({"model": "m", "extract": {"hooks": ["resid_final"]}}, "'hooks' parameter of ExtractConfig"),
        ({"model": {"name": "m", "dtype": "fp8"}}, "'dtype' parameter of ModelConfig"),
        ({"model": "m", "train": "fast"}, "'train' section must be a mapping"),
        ({"train": {}}, "needs a 'model' section"),
        # Type errors: under the test suite's runtime type checker the message differs, the key does not.
        ({"model": "m", "analysis": {"primary_layer": "20"}}, "(?s)'analysis' section: .*primary_layer"),
        ({"model": "m", "extract": {"layers": ["a"]}}, "(?s)'extract' section: .*layers"),
        ({"model": "m", "eval": {"batch_size": 0}}, "'batch_size' parameter of EvalConfig must be a positive int"),
        ({"model": "m", "geometry": {"centering": 5}}, "(?s)'geometry' section: .*centering"),
    ],
)
def test_bad_config_is_one_error_naming_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"geometry": {"reference": "assistant"}}, "'geometry.reference' names 'assistant'"),
        ({"marker": {"sources": ["pirate"]}}, "'marker.sources' names 'pirate'"),
        ({"analysis": {"holdout": ["nobody"]}}, "'analysis.holdout' names 'nobody'"),
        ({"extract": {"layers": [1, 2]}, "analysis": {"primary_layer": 20}}, "'analysis.primary_layer' is 20, which is not among"),
        ({"model": {"name": "m", "chat_template": "missing.jinja"}}, "'chat_template' parameter of ModelConfig"),
    ],
)
def test_unknown_persona_names_fail_before_any_model_loads(data, message):
    with pytest.raises(ValueError, match=message):
        study_inputs(StudyConfig.from_dict({"model": "m", **data}))


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'config' parameter of StudyConfig.load must be an existing YAML file"):
        StudyConfig.load(tmp_path / "nope.yaml")


def test_file_paths_resolve_against_the_config_folder(tmp_path):
    import yaml

    from persona_geometry.pipeline.study import _stage_keys

    (tmp_path / "chatml.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"model": {"name": "m", "chat_template": "chatml.jinja"}}))
    config = StudyConfig.load(tmp_path / "study.yaml")
    assert config.model.chat_template == str(tmp_path / "chatml.jinja")
    assert config.model.template_text().startswith("{% for m in messages %}")
    before = _stage_keys(config, study_inputs(config))
    (tmp_path / "chatml.jinja").write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    after = _stage_keys(config, study_inputs(config))
    assert before["extract"] != after["extract"]  # the template's text is in the key, not only its name
