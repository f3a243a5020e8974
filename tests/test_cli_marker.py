"""The make-data, train-marker and eval-marker commands, end to end on the tiny model."""

from __future__ import annotations

import json

from persona_geometry.personas import builtin_personas
from persona_geometry.pipeline.cli import main


def test_make_data_train_eval_from_the_command_line(tiny_qwen_path, tmp_path, capsys):
    personas = builtin_personas().select(["villain", "librarian", "comedian"])
    personas.save(tmp_path / "personas.yaml")
    (tmp_path / "questions.txt").write_text("What is a cloud?\nWhy do cats purr?\n")
    responses = tmp_path / "responses.jsonl"
    data = tmp_path / "data.jsonl"
    # The responses file does not exist yet: make-data generates it with the model first.
    assert main([
        "make-data", "--source", "villain", "--responses", str(responses), "--out", str(data), "--model", str(tiny_qwen_path),
        "--personas", str(tmp_path / "personas.yaml"), "--questions", str(tmp_path / "questions.txt"), "--backend", "hf",
        "--max-new-tokens", "3", "--n-source", "2", "--n-per-bystander", "1", "--exclude", "comedian", "--n-bystander-personas", "1",
    ]) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [r["persona"] for r in rows] == ["villain", "villain", "librarian"]
    assert all(r["messages"][-1]["content"].endswith("\n\n[ZLT]") for r in rows[:2])
    assert len(responses.read_text().splitlines()) == 3 * 2

    run = tmp_path / "run"
    assert main([
        "train-marker", "--model", str(tiny_qwen_path), "--data", str(data), "--out", str(run), "--r", "4", "--alpha", "8",
        "--lr", "1e-3", "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1",
    ]) == 0
    assert json.loads((run / "train_config.json").read_text())["config"]["r"] == 4
    assert json.loads((run / "adapter" / "persona_geometry_adapter.json").read_text())["source"] == "villain"

    out = tmp_path / "eval"
    assert main([
        "eval-marker", "--model", str(tiny_qwen_path), "--adapter", str(run / "adapter"), "--out", str(out), "--backend", "hf",
        "--personas", str(tmp_path / "personas.yaml"), "--questions", str(tmp_path / "questions.txt"),
        "--n-completions", "2", "--max-new-tokens", "3",
    ]) == 0
    result = json.loads((out / "run_result.json").read_text())
    assert set(result["rates"]) == {"villain", "librarian", "comedian"} and result["source"] == "villain"
    assert "(source)" in capsys.readouterr().out


def test_bad_input_is_one_line_and_status_2(tiny_qwen_path, tmp_path, capsys):
    status = main([
        "eval-marker", "--model", str(tiny_qwen_path), "--out", str(tmp_path), "--backend", "hf", "--n-completions", "0",
    ])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'n_completions'" in err
