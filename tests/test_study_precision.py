"""One precision policy: every stage of a study runs at the dtype and device its config says.

Each stage records the dtype it ran at (extraction's manifest reads it off the loaded weights,
training's train_config.json too; response generation and evaluation record the dtype they
loaded the model at); the test reads them back. Before the policy, extraction ran at the
config's dtype while training ignored it (float32 on CPU whatever the config said).
"""

from __future__ import annotations

import json

import pytest

from persona_geometry.pipeline.config import StudyConfig
from persona_geometry.pipeline.study import run_study

from conftest import STUDY_PERSONAS, STUDY_QUESTIONS, write_study

pytestmark = pytest.mark.slow

def _study(tmp_path, model, dtype, train_dtype=None):
    path = write_study(
        tmp_path, model, personas=STUDY_PERSONAS[:3], questions=STUDY_QUESTIONS[:2], n_train=4, settings={},
        model={"dtype": dtype},
        marker={"sources": ["villain"]},
        data={"n_source": 4, "n_per_bystander": 2, "n_bystander_personas": 1},
        responses={"max_new_tokens": 2, "backend": "hf"},
        train={"max_steps": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 64, "r": 2,
               "save_steps": 100, "dtype": train_dtype},
        eval={"backend": "hf", "n_completions": 1, "max_new_tokens": 2},
    )  # fmt: skip
    return StudyConfig.load(path)


def _dtypes(out) -> dict[str, set[str]]:
    from persona_geometry.activations import ActivationSet

    stage = json.loads((out / "extract" / ".stage.json").read_text())
    responses = [json.loads(line) for line in (out / "data" / "responses.jsonl").read_text().splitlines()]
    return {
        "extract": {ActivationSet.load(stage["files"]["activations"]).manifest["dtype"]},
        "data": {r["dtype"] for r in responses},
        "train": {json.loads((out / "train" / "villain" / "seed42" / "train_config.json").read_text())["dtype"]},
        "eval": {json.loads((out / "eval" / "villain" / "seed42" / "run_result.json").read_text())["provenance"]["dtype"]},
    }


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", "bfloat16"), ("auto", "float32")])
def test_every_stage_runs_at_the_configured_dtype(tiny_qwen_path, tmp_path, dtype, expected):
    config = _study(tmp_path, tiny_qwen_path, dtype)
    run_study(config, stages=["extract", "data", "train", "eval"], progress=False)
    assert _dtypes(tmp_path / "out") == {stage: {expected} for stage in ("extract", "data", "train", "eval")}


def test_train_dtype_overrides_and_float16_training_is_refused_up_front(tiny_qwen_path, tmp_path):
    assert _study(tmp_path, tiny_qwen_path, "bfloat16", train_dtype="float32").train_dtype() == "float32"
    assert _study(tmp_path, tiny_qwen_path, "bfloat16").train_dtype() == "bfloat16"
    with pytest.raises(ValueError, match="'train.dtype' parameter of StudyConfig"):
        _study(tmp_path, tiny_qwen_path, "float16")
