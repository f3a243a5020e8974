"""Every Python block of the README runs, in order, in one namespace, offline, on the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.slow

# The README's marker snippet uses the study's sizes (200 questions, 512 tokens, 3 epochs). On a
# CPU these shrink; each replacement must match exactly once, so the README cannot drift from it.
_SPEED = [
    ('out_path="runs/responses.jsonl", backend=backend)', 'pg.training_questions()[:8], out_path="runs/responses.jsonl", backend=backend, max_new_tokens=8)'),
    ('exclude=("helpful_assistant",))', 'exclude=("helpful_assistant",), n_source=8, n_per_bystander=8)'),
    ("pg.MarkerTrainConfig())", "pg.MarkerTrainConfig(max_steps=2, max_length=128))"),
    ('personas, backend=backend, out_dir="runs/villain/eval")', 'personas, pg.builtin_questions()[:2], n_completions=1, max_new_tokens=8, backend=backend, out_dir="runs/villain/eval")'),
    ('personas, backend="hf",', 'personas, pg.builtin_questions()[:2], n_completions=1, max_new_tokens=8, backend="hf",'),
]


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = _blocks()
    assert len(blocks) >= 5 and "build_tiny_model" in blocks[0]  # the tiny model comes first
    source = "\n".join(blocks)
    for old, new in _SPEED:
        assert source.count(old) == 1, f"README no longer contains {old!r}"
        source = source.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - the README is the code under test
    # What the snippets promise: a [persona, layer] table, a sweep at the declared layer, rates for every persona.
    cos, sweep, rates = namespace["cos"], namespace["sweep"], namespace["rates"]
    assert cos.to_wide().shape == (12, 4) and sweep.primary_layer == namespace["layer"] == 2
    assert [r.persona for r in rates.rates] == list(namespace["personas"].names)
    assert sorted(namespace["by_source"]) == ["comedian", "villain"]
    assert "pirate" in namespace["acts"].personas.names and (tmp_path / "runs" / "villain" / "eval" / "run_result.json").is_file()
