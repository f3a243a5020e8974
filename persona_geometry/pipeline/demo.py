"""The embedded demo: the whole pipeline offline, on a tiny model built on the spot.

The tiny model has random weights, so the geometry and the rates it produces show the
mechanics of the pipeline (extraction, marker data, LoRA training, source-rate evaluation,
layer sweep, robustness report), not a finding about any real model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from persona_geometry._io import atomic_write_text
from persona_geometry.pipeline.config import StudyConfig
from persona_geometry.pipeline.study import StudyResult, run_study

__all__ = ["DISCLAIMER", "demo_config", "demo_headline", "run_demo"]

log = logging.getLogger(__name__)

DISCLAIMER = (
    "This demo runs on a tiny model with RANDOM weights: its cosines and rates show the "
    "mechanics of the pipeline, not a finding about any real model."
)


def demo_config(out: str | os.PathLike[str], model_path: str | os.PathLike[str]) -> StudyConfig:
    """Returns the demo's study config: 12 built-in personas × 20 questions, short training."""
    return StudyConfig.from_dict(
        {
            "name": "demo (tiny random model)",
            "out": str(out),
            "model": {"name": str(model_path), "dtype": "float32", "device": "cpu"},
            "marker": {"sources": "all", "seeds": [42]},
            # Short answers, few rows and a high learning rate keep 12 trainings within a couple
            # of CPU minutes; evaluation leaves room for answer + separator + marker.
            "data": {"n_source": 24, "n_per_bystander": 24},
            "responses": {"max_new_tokens": 6, "backend": "hf"},
            "train": {
                "learning_rate": 5e-3,
                "num_train_epochs": 3,
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 1,
                "max_length": 96,
                "r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "save_steps": 1000,
            },
            "eval": {"backend": "hf", "n_completions": 2, "max_new_tokens": 16, "batch_size": 240},
            "analysis": {"primary_layer": 2, "n_permutations": 2000, "n_bootstrap": 500},
        }
    )


def run_demo(out: str | os.PathLike[str] = "demo_output", *, progress: bool = True) -> StudyResult:
    """Returns the result of the whole pipeline run on an embedded tiny model, written to
    ``out``."""
    from persona_geometry._io import check_replaceable
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    out = Path(out)
    # A new or empty folder, or an earlier demo's (it is resumed); never a file or someone else's
    # folder.
    check_replaceable(
        out, owned=lambda p: (p / "demo_study.yaml").is_file(), param="out", func="run_demo"
    )
    # Hidden size 256: at 128 the random unembedding caps every token's probability too low for
    # a multi-token marker to be emitted reliably, whatever the adapter learns.
    spec = TinyModelSpec(
        hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512
    )
    model_path = build_tiny_model(out / "tiny-model", spec)
    config = demo_config(out / "study", model_path)
    import yaml

    atomic_write_text(
        out / "demo_study.yaml",
        yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True),
    )
    return run_study(config, progress=progress)


def demo_headline(result: StudyResult) -> str:
    """Returns what a person runs the demo for: the primary result, the strongest layer, the report.

    Read from the study's ``report/report.json``; the random-weights disclaimer ends it, once.
    """
    import json

    report_dir = result.out / "report"
    report = json.loads((report_dir / "report.json").read_text())
    sweep = report["sweep"]
    stat = sweep["statistic"]
    name, key = ("Spearman ρ", "rho") if stat == "spearman" else ("Pearson r", "r")

    def num(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    def at(entry: dict) -> str:
        s = entry[stat]
        return f"{name} = {num(s[key], '+.2f')} (p = {num(s['p'], '.3g')}, n = {entry['n']})"

    times = ", ".join(f"{s} {result.seconds[s]:.0f}s" for s in result.ran if s in result.seconds)
    lines = [
        f"Demo finished: {len(report['personas'])} personas, {len(sweep['layers'])} layers "
        f"({times or 'all stages cached'})."
    ]
    if sweep["primary"] is not None:
        lines.append(
            f"  primary layer {sweep['primary_layer']} (declared in advance): "
            f"{at(sweep['primary'])}"
        )
    mx = sweep["max_statistic"]
    honest = (
        f"; max-over-layers p = {num(mx['p'], '.3g')} ({mx['n_permutations']} permutations)"
        if mx["n_permutations"]
        else ""
    )
    lines.append(f"  strongest layer {sweep['best_layer']}: {at(sweep['best'])}{honest}")
    lines.append(
        f"  report: {report_dir / 'report.md'} (figures beside it: "
        f"{', '.join(sorted(p.name for p in report_dir.glob('*.html')))})"
    )
    lines.append(DISCLAIMER)
    return "\n".join(lines)
