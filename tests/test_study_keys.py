"""Nothing stale: a study's stage keys cover the model's identity, and a stage that read another
stage's outputs runs again when those outputs change; corrupt activations are recomputed."""

from __future__ import annotations

import pytest

from persona_geometry.models import model_identity
from persona_geometry.pipeline.config import StudyConfig
from persona_geometry.pipeline.study import _stage_keys, study_inputs

from conftest import STUDY_PERSONAS, STUDY_QUESTIONS, write_study

pytestmark = pytest.mark.slow

def _config(tmp_path, model):
    path = write_study(
        tmp_path, model, personas=STUDY_PERSONAS[:3], questions=STUDY_QUESTIONS[:3], n_train=8, name="keys",
        data={"n_source": 8, "n_per_bystander": 8},
        responses={"max_new_tokens": 4},
        train={"num_train_epochs": 1, "max_length": 64, "r": 4, "lora_alpha": 8},
        eval={"n_completions": 2, "max_new_tokens": 6},
        analysis={"n_permutations": 50, "n_bootstrap": 20},
    )  # fmt: skip
    return StudyConfig.load(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from persona_geometry.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("keys") / "tiny")


def _keys(config):
    return _stage_keys(config, study_inputs(config))


def test_keys_cover_rebuilt_weights_and_an_edited_tokenizer_template(tmp_path):
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    model = build_tiny_model(tmp_path / "m")
    config = _config(tmp_path, model)
    before = _keys(config)
    build_tiny_model(model, TinyModelSpec(seed=7), overwrite=True)  # new weights, same name and config
    rebuilt = _keys(config)
    assert all(rebuilt[s] != before[s] for s in before), "every stage depends on the weights"
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    edited = _keys(config)
    assert all(edited[s] != rebuilt[s] for s in before), "every stage depends on the tokenizer's template"
    assert _keys(config) == edited  # and nothing else moves them


def test_identity_follows_the_commit_a_hub_revision_resolves_to(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    first = model_identity("org/tiny")
    (repo / "refs" / "main").write_text("b" * 40)  # the branch moved on
    second = model_identity("org/tiny")
    assert (first["commit"], second["commit"]) == ("a" * 40, "b" * 40)
    assert model_identity("org/tiny", revision="a" * 40)["commit"] == "a" * 40
    assert model_identity("org/absent") == {"model": "org/absent", "revision": None, "commit": None, "weights": None, "tokenizer": None}
