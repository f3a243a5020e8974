"""The study runner end to end on a tiny model: every stage, caching, partial re-runs, CLI errors."""

from __future__ import annotations

import json

import pytest
import yaml

from persona_geometry.pipeline.cli import main
from persona_geometry.pipeline.config import StudyConfig
from persona_geometry.pipeline.study import run_study

from conftest import write_study

pytestmark = pytest.mark.slow

def _config(tmp_path, model, **overrides):
    return write_study(tmp_path, model, name="tiny study", **overrides)


@pytest.fixture(scope="module")
def study(tiny_qwen256_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    path = _config(tmp, tiny_qwen256_path)
    result = run_study(StudyConfig.load(path), progress=False)
    return tmp, path, result


def test_every_stage_runs_and_writes_its_outputs(study):
    tmp, _, result = study
    out = tmp / "out"
    assert result.ran == ("extract", "data", "train", "eval", "sweep", "report") and not result.skipped
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["n_personas"] == 4 and report["layer"] == 1 and report["layer_choice"] == "primary"
    # The report's counts are the eval's counts, which are the completions on disk.
    for name in ("villain", "librarian"):
        run = json.loads((out / "eval" / name / "seed42" / "run_result.json").read_text())
        row = next(r for r in run["personas"] if r["persona"] == name)
        rows = [json.loads(line) for line in (out / "eval" / name / "seed42" / "completions.jsonl").read_text().splitlines()]
        mine = [r for r in rows if r["persona"] == name]
        assert row["n"] == len(mine) == 4 * 3 and row["k"] == sum("[zlt]" in r["completion"].lower() for r in mine)
        low, high = report["wilson"][name]
        assert low <= row["k"] / row["n"] <= high
    assert (out / "config.resolved.yaml").is_file() and (out / "report" / "report.md").read_text().startswith("# tiny study")
    md = (out / "report" / "report.md").read_text()
    for fig in ("scatter.html", "sweep.html", "heatmap.html", "heatmap_grid.html"):
        assert (out / "report" / fig).is_file() and f"]({fig})" in md  # report.md links every figure
    # One plotly.js per report folder, loaded from beside the figures: offline, not 4.8 MB per file.
    assert [p.name for p in (out / "report").glob("*.js")] == ["plotly.min.js"]


def test_compare_reads_a_real_study_and_a_copy_of_it_as_two_seeds(study, tmp_path):
    import shutil

    from persona_geometry.analysis import compare_studies

    out = study[0] / "out"
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("train", "data", "cache", "*.html"))
    result = compare_studies([out, copy])
    report = json.loads((out / "report" / "report.json").read_text())
    row = result.to_frame().iloc[0]
    assert row["n_layers"] == 4 and row["primary_layer"] == 1  # blocks from the extraction manifest
    assert row["primary_value"] == report["sweep"]["per_layer"][1]["spearman"]["rho"]
    assert result.meta.layers == (1, 1) and result.meta.tau2 == 0 and result.meta.q == pytest.approx(0, abs=1e-12)
    (group,) = result.seed_groups
    assert sorted(group.seed_corr.columns) == ["copy:42", "out:42"]
    for name in ("villain", "librarian"):
        run = json.loads((out / "eval" / name / "seed42" / "run_result.json").read_text())
        mine = next(r for r in run["personas"] if r["persona"] == name)
        i = group.pooled.personas.index(name)
        assert (group.pooled.k[i], group.pooled.n[i]) == (2 * mine["k"], 2 * mine["n"])


def test_unchanged_inputs_skip_every_stage(study):
    _, path, _ = study
    again = run_study(StudyConfig.load(path), progress=False)
    assert again.ran == () and len(again.skipped) == 6


def test_declared_holdouts_are_stars_in_the_study_scatter(study, tiny_qwen256_path):
    tmp, _, _ = study
    # The fixture's settings plus a held-out persona: only sweep and report depend on the analysis.
    path = _config(tmp, tiny_qwen256_path, analysis={"holdout": ["comedian"]})
    again = run_study(StudyConfig.load(path), progress=False)
    assert again.ran == ("sweep", "report")
    html = (tmp / "out" / "report" / "scatter.html").read_text()
    assert '"symbol":"star"' in html and "comedian (held out)" not in html and "character (held out)" in html
    report = json.loads((tmp / "out" / "report" / "report.json").read_text())
    assert [h["persona"] for h in report["holdout"]] == ["comedian"]


def test_demo_headline_says_the_result_once(study):
    from scipy import stats

    from persona_geometry.pipeline.demo import DISCLAIMER, demo_headline

    tmp, _, result = study
    report = json.loads((tmp / "out" / "report" / "report.json").read_text())
    text = demo_headline(result)
    # The primary layer is the report's layer: its rho is the rank correlation of the report's x and rates.
    # report.json keys x and rates by persona; read both in the report's persona order.
    names = report["personas"]
    rho, p = stats.spearmanr([report["x"][n] for n in names], [report["rates"][n] for n in names])
    assert f"primary layer 1 (declared in advance): Spearman ρ = {rho:+.2f} (p = {p:.3g}, n = 4)" in text
    assert f"strongest layer {report['sweep']['best_layer']}:" in text and "max-over-layers p = " in text
    assert str(tmp / "out" / "report" / "report.md") in text
    assert text.count(DISCLAIMER) == 1 and len(text.splitlines()) == 5


def test_changed_eval_settings_rerun_only_what_depends_on_them(study, tiny_qwen256_path):
    tmp, _, _ = study
    path = _config(tmp, tiny_qwen256_path, eval={"n_completions": 2})
    again = run_study(StudyConfig.load(path), progress=False)
    assert again.ran == ("eval", "sweep", "report") and again.skipped == ("extract", "data", "train")
    run = json.loads((tmp / "out" / "eval" / "villain" / "seed42" / "run_result.json").read_text())
    assert all(r["n"] == 4 * 2 for r in run["personas"])


def test_changed_training_settings_retrain_in_place(study, tiny_qwen256_path):
    tmp, _, _ = study
    # Keeps the eval change of the previous test; only the recipe differs now.
    path = _config(tmp, tiny_qwen256_path, eval={"n_completions": 2}, train={"learning_rate": 4e-3})
    again = run_study(StudyConfig.load(path), progress=False)
    assert again.ran == ("train", "eval", "sweep", "report")
    saved = json.loads((tmp / "out" / "train" / "villain" / "seed42" / "train_config.json").read_text())
    assert saved["config"]["learning_rate"] == 4e-3


def test_cli_run_reports_a_bad_config_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "x"}, "train": {"lr": 1e-3}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Unknown key 'train.lr'" in err


def test_cli_run_rejects_an_unknown_stage(study, capsys):
    _, path, _ = study
    assert main(["run", str(path), "--stages", "extract,plot"]) == 2
    assert "'stages' parameter of run_study" in capsys.readouterr().err

