"""CPU benchmark of the probes at the reference study's size: how long a user waits.

Workload: synthetic activations shaped like the study's (12 personas × 20 questions × 28 layers ×
d_model 3584, float32), with a planted persona signal so that the solvers do real work.
Measured: ``probe_layers`` for persona identity (logistic) and for a per-persona variable
(ridge), default ``ProbeConfig`` (5 question-grouped folds, 3 shuffled-label runs), and the
directions/projection path (``mean_difference``, ``assistant_axis``, ``project`` per prompt).

Usage (single-threaded BLAS: on a busy 2-core machine multi-threaded BLAS oversubscribes the
cores and ran 14× slower, 70 s instead of 5 s for two layers)::

    OMP_NUM_THREADS=1 python benchmarks/probes_cpu.py --out benchmarks/results/probes_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from harness import best_of, machine


def _acts(P: int, Q: int, L: int, D: int, seed: int = 0):
    from persona_geometry.activations import ActivationSet
    from persona_geometry.personas import builtin_personas

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, Q, L, D, generator=g) + torch.randn(1, Q, L, D, generator=g)
    x += 0.3 * torch.randn(P, 1, L, D, generator=g)  # persona signal, a few σ over 3584 dims
    return ActivationSet(
        {"resid_post": x},
        personas=builtin_personas()[:P],
        questions=[f"q{i}?" for i in range(Q)],
        layers=list(range(L)),
        n_tokens=torch.full((P, Q), 40),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--personas", type=int, default=12)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--d-model", type=int, default=3584)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from persona_geometry.probes import (
        ProbeConfig,
        assistant_axis,
        mean_difference,
        probe_layers,
        project,
    )

    acts = _acts(args.personas, args.questions, args.layers, args.d_model)
    config = ProbeConfig()
    t_dir, _ = best_of(lambda: (mean_difference(acts, ["villain", "comedian"]), assistant_axis(acts)))
    axis = assistant_axis(acts)
    t_proj, _ = best_of(lambda: project(acts, axis, centering="all"))
    t_log, res_log = best_of(lambda: probe_layers(acts, "persona", config=config, progress=False))
    values = {n: float(i) for i, n in enumerate(acts.personas.names)}
    t_ridge, res_ridge = best_of(lambda: probe_layers(acts, values, config=config, progress=False))
    result = {
        "machine": machine("2 shared CPU cores (other jobs running), no GPU"),
        "workload": {
            "personas": args.personas,
            "questions": args.questions,
            "layers": args.layers,
            "d_model": args.d_model,
            "probe_config": config.to_dict(),
        },
        "seconds": {
            "directions (mean_difference + assistant_axis)": round(t_dir, 3),
            "project per prompt, centered": round(t_proj, 3),
            "probe_layers persona (logistic)": round(t_log, 1),
            "probe_layers per-persona variable (ridge)": round(t_ridge, 1),
        },
        "fits": {
            "logistic": args.layers * len(res_log.folds) * (1 + config.n_shuffles),
            "ridge": args.layers * len(res_ridge.folds) * (1 + config.n_shuffles),
        },
        "best_layer_accuracy": res_log.best_score,
        "baseline_accuracy_mean": float(res_log.baseline.mean()),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
