"""Benchmark: the layer sweep on 1,000 personas x 100 layers with 10,000 permutations, on CPU.

Run: ``.venv/bin/python benchmarks/sweep_cpu.py [--out benchmarks/results/sweep_cpu.json]``.
Times the permutation test alone (bootstrap off), the bootstrap alone, and the whole default
call, and extrapolates what a per-layer scipy loop would take for the same permutations.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from scipy import stats

from persona_geometry import layer_sweep
from persona_geometry._io import atomic_write_json
from persona_geometry.provenance import package_versions

from harness import best_of, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--personas", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--permutations", type=int, default=10_000)
    parser.add_argument("--bootstrap", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_cpu.json"))
    args = parser.parse_args()

    # Recorded first: its load average is the one before the timings.
    record = machine("shared 2-core development container (other jobs running); times are the best of repeats")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.personas, args.layers))
    y = rng.uniform(size=args.personas)
    P, L, B = args.personas, args.layers, args.permutations

    t_perm, _ = best_of(lambda: layer_sweep(x, y, n_permutations=B, n_bootstrap=0), args.repeats)
    t_boot, _ = best_of(lambda: layer_sweep(x, y, n_permutations=0, n_bootstrap=args.bootstrap))
    t_full, _ = best_of(lambda: layer_sweep(x, y, n_permutations=B, n_bootstrap=args.bootstrap))
    # What a naive loop (scipy.stats.spearmanr per layer per permutation) would cost: time 20
    # permutations x all layers and scale up.
    n_probe = 20
    t0 = time.perf_counter()
    for _ in range(n_probe):
        yp = rng.permutation(y)
        for j in range(L):
            stats.spearmanr(x[:, j], yp)
    t_loop = (time.perf_counter() - t0) / n_probe * B

    result = {
        "benchmark": "layer_sweep on CPU",
        "shape": {"personas": P, "layers": L, "permutations": B, "bootstrap": args.bootstrap},
        "seconds": {
            "permutation_test_only": round(t_perm, 3),
            "bootstrap_only": round(t_boot, 3),
            "full_default_call": round(t_full, 3),
            "naive_scipy_loop_permutations_extrapolated": round(t_loop, 1),
        },
        "speedup_vs_naive_loop": round(t_loop / t_perm, 1),
        "machine": {**record, "load_average_1_5_15_min_after": [round(v, 2) for v in os.getloadavg()]},
        "package_versions": package_versions(),
    }
    atomic_write_json(args.out, result)
    print(result["seconds"], "speedup", result["speedup_vs_naive_loop"])


if __name__ == "__main__":
    main()
