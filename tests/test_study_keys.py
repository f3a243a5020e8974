"""Nothing stale: a study's stage keys cover the model's identity, and a stage that read another
stage's outputs runs again when those outputs change; corrupt activations are recomputed."""

from __future__ import annotations

import pytest
import yaml

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


def test_weights_rebuilt_in_place_in_one_process_are_extracted_anew(tmp_path):
    """One process, two runs: the second must not reuse the model (or activations) loaded for the first."""
    import torch

    from persona_geometry import extract_activations, load_model
    from persona_geometry.pipeline.study import _extracted, run_study
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    model = build_tiny_model(tmp_path / "m")
    config = _config(tmp_path, model)
    first = run_study(config, stages=["extract"], progress=False)
    old = _extracted(first.out, "activations")
    build_tiny_model(model, TinyModelSpec(seed=7), overwrite=True)  # new weights, same folder
    second = run_study(config, stages=["extract"], progress=False)
    assert second.ran == ("extract",)
    new = _extracted(second.out, "activations")
    assert new.manifest["weights_id"] != old.manifest["weights_id"]
    # The reference: the rebuilt model loaded on its own.
    inputs = study_inputs(config)
    ref = extract_activations(load_model(model, dtype="float32", device="cpu"), inputs.personas, inputs.questions, progress=False)
    torch.testing.assert_close(new["resid_post"], ref["resid_post"])
    assert not torch.allclose(new["resid_post"], old["resid_post"])


def test_two_runs_on_one_folder_train_each_adapter_once(tmp_path):
    """Two real processes start the same study on one output folder: every unit (the data and each
    adapter) runs in exactly one of them; the other waits on the unit's lock and reuses the result."""
    import subprocess
    import sys

    from persona_geometry.tiny import build_tiny_model

    _config(tmp_path, build_tiny_model(tmp_path / "m"))
    study = yaml.safe_load((tmp_path / "study.yaml").read_text())
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**study, "marker": {"sources": ["villain", "librarian"]}}))
    cmd = [sys.executable, "-m", "persona_geometry.pipeline.cli", "run", str(tmp_path / "study.yaml"),
           "--stages", "data,train", "--executor", "inprocess", "--no-progress", "-v"]  # fmt: skip
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [r.communicate(timeout=600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [d[1][-2000:] for d in done]
    out = tmp_path / "out"
    logs = sorted(out.glob("train/*/seed*/unit.log"))
    assert sorted(p.parent.parent.name for p in logs) == ["librarian", "villain"]
    for log in [out / "data" / "unit.log", *logs]:
        started = [line for line in log.read_text().splitlines() if ": running on " in line]
        assert len(started) == 1, (log, started)  # one process ran it, once
        assert int(started[0].split("(pid ")[1].split(",")[0]) in {r.pid for r in runs}
    # A redone unit's log holds only the redo: the processes' own logs say whether a unit ran twice
    # (the waiting one once cleared the data the other was training from, and redid it).
    logged = "\n".join(d[1] for d in done)
    for unit in ("data", "train/villain/seed42", "train/librarian/seed42"):
        assert logged.count(f"unit {unit}: running on ") == 1, (unit, logged[-3000:])
    assert "made for other inputs" not in logged


def test_a_stage_key_follows_the_recorded_outputs_of_the_stages_it_reads(tmp_path):
    """A re-run stage that rewrote its outputs (forced, or new weights) re-runs what read them, and nothing else."""
    from persona_geometry.pipeline.study import _stage_key, _stage_record

    def record(stage, key, outputs):
        r = _stage_record(tmp_path / stage, key)
        r.begin(force=True)
        r.finish(files={}, outputs=outputs)

    for stage in ("extract", "data", "train", "eval", "sweep"):
        record(stage, f"{stage}-key", "first")
    before = {s: _stage_key(tmp_path, s, "settings") for s in ("data", "train", "eval", "sweep", "report")}
    record("extract", "extract-key", "rewritten")  # same settings, new files
    after = {s: _stage_key(tmp_path, s, "settings") for s in before}
    assert [s for s in before if after[s] != before[s]] == ["sweep", "report"]
    record("data", "data-key", "rewritten")
    assert _stage_key(tmp_path, "train", "settings") != after["train"]
    assert _stage_key(tmp_path, "sweep", "settings") == after["sweep"]  # the sweep reads eval, not data directly


def test_a_data_unit_recorded_over_by_its_stage_is_cached_and_a_changed_data_setting_redoes_it(tmp_path):
    """The data unit and the data stage keep their records in one folder. A second process that
    reaches the data unit after the first finished the whole stage (what it finds once it gets the
    unit's lock) must see the unit done and delete nothing; new data settings still redo it."""
    import dataclasses

    from persona_geometry.pipeline.study import run_study, run_unit, study_units
    from persona_geometry.tiny import build_tiny_model

    config = _config(tmp_path, build_tiny_model(tmp_path / "m"))
    first = run_study(config, stages=["data"], progress=False)
    assert first.ran == ("data",) and first.computed == ("data",)
    data = tmp_path / "out" / "data"

    def stats():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in data.iterdir() if p.name != ".stage.json"}

    before = stats()
    source = study_inputs(config).sources[0]
    assert {"responses.jsonl", f"{source}.jsonl", "unit.log"} <= set(before)
    (unit,) = study_units(config, "data")
    files = run_unit(config, unit)  # the stage's record, written after the unit's, is in the unit's folder
    assert files == {k: v for k, v in first.files.items() if k == "responses" or k.startswith("data:")}
    assert stats() == before, "the finished data unit was deleted and redone"
    # A changed data setting is other work: the unit redoes it, and the stage runs again on it.
    changed = config.with_overrides(data=dataclasses.replace(config.data, n_source=4))
    (new_unit,) = study_units(changed, "data")
    assert new_unit.key != unit.key
    rows = len((data / f"{source}.jsonl").read_text().splitlines())
    run_unit(changed, new_unit)
    assert (data / f"{source}.jsonl").stat().st_mtime_ns != before[f"{source}.jsonl"][1]
    assert len((data / f"{source}.jsonl").read_text().splitlines()) == rows - 4
    again = run_study(changed, stages=["data"], progress=False)
    assert again.ran == ("data",) and again.computed == ()  # the stage records it; the unit is cached
    assert run_study(changed, stages=["data"], progress=False).skipped == ("data",)
