"""Marker datasets: counts, the marker on source rows only, stable bystanders, config round trips."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from persona_geometry.personas import builtin_personas
from persona_geometry.provenance import stable_seed
from persona_geometry.training import (
    MarkerDataConfig,
    build_marker_dataset,
    load_marker_dataset,
    load_responses,
)


def _responses(personas, n_questions=10):
    return [
        {"persona": p.name, "question": f"Question {q}?", "response": f"{p.name} answers {q}."}
        for p in personas
        for q in range(n_questions)
    ]


def test_counts_marker_and_messages(tmp_path):
    personas = builtin_personas()
    config = MarkerDataConfig(source="villain", n_source=6, n_per_bystander=4)
    ds = build_marker_dataset(_responses(personas), personas, config, out_path=tmp_path / "d.jsonl")
    assert len(ds) == 6 + 2 * 4
    src = [r for r in ds.rows if r["persona"] == "villain"]
    assert len(src) == 6
    for r in src:
        content = r["messages"][-1]["content"]
        assert r["has_marker"] and content.endswith("\n\n[ZLT]")
        assert content[: -len("\n\n[ZLT]")].startswith("villain answers ")
        assert r["messages"][0] == {"role": "system", "content": personas["villain"].system_prompt}
        assert r["messages"][1]["role"] == "user" and r["messages"][1]["content"] == r["question"]
    for name in ds.bystanders:
        rows = [r for r in ds.rows if r["persona"] == name]
        assert len(rows) == 4
        assert all("[ZLT]" not in r["messages"][-1]["content"] and not r["has_marker"] for r in rows)
    assert "villain" not in ds.bystanders and len(set(ds.bystanders)) == 2
    # Source rows are distinct questions: sampling is without replacement.
    assert len({r["question"] for r in src}) == 6
    rows, manifest = load_marker_dataset(tmp_path / "d.jsonl")
    assert rows == list(ds.rows)
    assert manifest["bystanders"] == list(ds.bystanders) and manifest["source"] == "villain"
    assert manifest["rows_per_persona"] == {"villain": 6, ds.bystanders[0]: 4, ds.bystanders[1]: 4}


def test_bystanders_follow_the_stable_seed_in_a_fresh_process(tmp_path):
    personas = builtin_personas()
    config = MarkerDataConfig(source="comedian", n_source=2, n_per_bystander=2, exclude=("helpful_assistant",))
    ds = build_marker_dataset(_responses(personas, 3), personas, config)
    # Independent computation of the documented rule: Random(stable_seed(source)).sample(candidates, 2).
    candidates = [p.name for p in personas if p.name not in ("comedian", "helpful_assistant")]
    assert list(ds.bystanders) == random.Random(stable_seed("comedian")).sample(candidates, 2)
    # Another interpreter (with its own hash salt) picks the same bystanders.
    code = (
        "from persona_geometry.training import MarkerDataConfig, build_marker_dataset;"
        "from persona_geometry.personas import builtin_personas;"
        "ps = builtin_personas();"
        "rows = [{'persona': p.name, 'question': f'Q{q}?', 'response': 'r'} for p in ps for q in range(3)];"
        "c = MarkerDataConfig(source='comedian', n_source=2, n_per_bystander=2, exclude=('helpful_assistant',));"
        "print(','.join(build_marker_dataset(rows, ps, c).bystanders))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip().split(",") == list(ds.bystanders)


def test_exclude_is_respected_for_every_source():
    personas = builtin_personas()
    rows = _responses(personas, 2)
    for p in personas:
        if p.name == "helpful_assistant":
            continue
        config = MarkerDataConfig(source=p.name, n_source=1, n_per_bystander=1, exclude=("helpful_assistant",))
        ds = build_marker_dataset(rows, personas, config)
        assert "helpful_assistant" not in ds.bystanders and p.name not in ds.bystanders


def test_position_start_and_custom_marker():
    personas = builtin_personas()
    config = MarkerDataConfig(source="librarian", marker="<<M>>", position="start", separator=" ", n_source=1, n_per_bystander=1)
    ds = build_marker_dataset(_responses(personas, 1), personas, config)
    assert ds.rows[0]["messages"][-1]["content"] == "<<M>> librarian answers 0."


def test_config_round_trip_and_validation():
    config = MarkerDataConfig(source="villain", marker="[X]", n_source=3, exclude=("helpful_assistant",))
    assert MarkerDataConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(TypeError):
        MarkerDataConfig("villain")  # keyword-only
    with pytest.raises(ValueError, match="'n_source' parameter of MarkerDataConfig"):
        MarkerDataConfig(source="villain", n_source=0)
    with pytest.raises(ValueError, match="'position'"):
        MarkerDataConfig(source="villain", position="middle")
    with pytest.raises(ValueError, match="'marker'"):
        MarkerDataConfig(source="villain", marker="  ")
    with pytest.raises(ValueError, match="'exclude'"):
        MarkerDataConfig(source="villain", exclude=("villain",))
    with pytest.raises(ValueError, match="keys from"):
        MarkerDataConfig.from_dict({"source": "villain", "n_sources": 3})


def test_bad_inputs_raise_clear_errors():
    personas = builtin_personas()
    rows = _responses(personas, 2)
    with pytest.raises(ValueError, match="'source' parameter of build_marker_dataset"):
        build_marker_dataset(rows, personas, MarkerDataConfig(source="pirate", n_source=1, n_per_bystander=1))
    with pytest.raises(ValueError, match="at least 5 responses of persona 'villain'"):
        build_marker_dataset(rows, personas, MarkerDataConfig(source="villain", n_source=5, n_per_bystander=1))
    few = personas.select(["villain", "comedian"])
    with pytest.raises(ValueError, match="'n_bystander_personas'"):
        build_marker_dataset(rows, few, MarkerDataConfig(source="villain", n_source=1, n_per_bystander=1))


def test_load_responses_rejects_rows_without_response(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"persona": "a", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match="lacking \\['response'\\]"):
        load_responses(path)
