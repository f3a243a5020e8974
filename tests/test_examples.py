"""Every example runs against the tiny model (switched by environment variables), so none can rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.slow


def _run(script: str, env: dict[str, str], cwd: Path) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_GEOMETRY_")}
    full.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env})
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], env=full, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def cached(tiny_qwen_path, tmp_path_factory):
    """Runs examples/centroids.py once; later examples read its cache."""
    out = tmp_path_factory.mktemp("examples") / "acts"
    stdout = _run("centroids.py", {"PERSONA_GEOMETRY_MODEL": str(tiny_qwen_path), "PERSONA_GEOMETRY_OUT": str(out)}, out.parent)
    return out, stdout


def test_centroids_example_caches_what_the_library_computes(cached, tiny_qwen_path):
    import persona_geometry as pg

    out, stdout = cached
    acts = pg.ActivationSet.load(out)
    again = pg.extract_activations(pg.load_model(str(tiny_qwen_path)), progress=False)
    torch.testing.assert_close(acts["resid_post"], again["resid_post"], atol=1e-5, rtol=0)
    cos = pg.cosine_to_reference(pg.center(pg.centroids(acts)))
    assert "helpful_assistant" in stdout and f"{cos.at(3)['villain']:.3f}" in stdout


def test_layer_sweep_example(cached):
    out, _ = cached
    stdout = _run("layer_sweep.py", {"PERSONA_GEOMETRY_ACTS": str(out)}, out.parent)
    assert "best layer" in stdout and "max over 4 layers" in stdout
    assert stdout.startswith("NOTE: no PERSONA_GEOMETRY_RATES file given, so these counts are MADE UP")


def test_examples_run_as_their_headers_say(tiny_qwen_path, tmp_path):
    """centroids.py with the tiny model, then follow_up.py and layer_sweep.py with no settings at all."""
    import shutil

    shutil.copytree(tiny_qwen_path, tmp_path / "runs" / "tiny-model")
    _run("centroids.py", {"PERSONA_GEOMETRY_MODEL": "runs/tiny-model"}, tmp_path)
    assert "pirate" in _run("follow_up.py", {}, tmp_path)
    assert "MADE UP" in _run("layer_sweep.py", {}, tmp_path)


def test_follow_up_example_adds_a_persona(cached, tiny_qwen_path):
    out, _ = cached
    stdout = _run("follow_up.py", {"PERSONA_GEOMETRY_ACTS": str(out), "PERSONA_GEOMETRY_MODEL": str(tiny_qwen_path)}, out.parent)
    assert "pirate" in stdout


def test_marker_example_writes_every_persona(tiny_qwen_path, tmp_path):
    env = {
        "PERSONA_GEOMETRY_MODEL": str(tiny_qwen_path),
        "PERSONA_GEOMETRY_BACKEND": "hf",
        "PERSONA_GEOMETRY_OUT": str(tmp_path / "marker"),
        "PERSONA_GEOMETRY_QUICK": "1",
    }
    _run("marker_source_rates.py", env, tmp_path)
    result = json.loads((tmp_path / "marker" / "villain" / "eval" / "run_result.json").read_text())
    import persona_geometry as pg

    assert [row["persona"] for row in result["personas"]] == pg.builtin_personas().names
    assert all(row["n"] == 2 for row in result["personas"])


def test_study_config_example_is_the_reference_recipe():
    from persona_geometry.pipeline.config import StudyConfig
    from persona_geometry.pipeline.study import study_inputs

    config = StudyConfig.load(EXAMPLES / "study_qwen7b.yaml")
    inputs = study_inputs(config)
    assert config.model.name == "Qwen/Qwen2.5-7B-Instruct" and config.analysis.primary_layer == 20
    assert (config.train.r, config.train.lora_alpha, config.train.use_rslora, config.eval.n_completions) == (32, 64, True, 5)
    assert len(inputs.sources) == 12 and len(inputs.questions) == 20
    # The recipe's 16 examples per optimiser step, however they are split into micro-batches.
    assert config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps == 16
