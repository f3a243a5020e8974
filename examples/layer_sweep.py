"""A layer sweep against source rates, and how to read its max-statistic p-value.

Run examples/centroids.py first (its header shows how, against the tiny model), then:

    python examples/layer_sweep.py
    PERSONA_GEOMETRY_RATES=rates.csv python examples/layer_sweep.py   # real counts: columns persona,k,n

It reads cached activations (runs/centroids/activations, or PERSONA_GEOMETRY_ACTS) and
per-persona marker counts k/n. Without a rates file it MAKES UP counts so that the script runs
end to end, and says so when it runs.

Reading the result: the per-layer p-values are for one layer each. Picking the strongest of L
layers makes its raw p-value too small, so look at `max_statistic_p` (a permutation test of the
maximum |rho| over layers: shuffle the rates across personas, recompute every layer, keep the
max) and at the pre-registered `primary_layer`, which is reported whatever the sweep finds.
"""

import os

import numpy as np
import pandas as pd

import persona_geometry as pg

if __name__ == "__main__":
    acts = pg.ActivationSet.load(os.environ.get("PERSONA_GEOMETRY_ACTS", "runs/centroids/activations"))
    cos = pg.cosine_to_reference(pg.center(pg.centroids(acts)), reference="helpful_assistant")
    if "PERSONA_GEOMETRY_RATES" in os.environ:
        table = pd.read_csv(os.environ["PERSONA_GEOMETRY_RATES"]).set_index("persona").loc[list(cos.personas)]
        k, n = table["k"].to_numpy(), table["n"].to_numpy()
    else:  # Illustrative counts: further from the assistant, more markers, plus noise.
        print("NOTE: no PERSONA_GEOMETRY_RATES file given, so these counts are MADE UP (illustration only).\n")
        rng = np.random.default_rng(0)
        mid = cos.values[:, len(cos.layers) // 2].numpy()
        k = rng.binomial(100, np.clip(0.5 - 0.4 * mid, 0.02, 0.98))
        n = np.full(len(k), 100)
    primary = cos.layers[len(cos.layers) // 2]  # declare it BEFORE looking at the sweep
    sweep = pg.layer_sweep(cos, k=k, n=n, primary_layer=primary, n_permutations=2000)
    print(sweep.summary())
    print(sweep.to_frame()[["layer", "spearman_rho", "spearman_p", "spearman_p_holm", "p_maxt"]].round(4).to_string(index=False))
    print(f"best layer {sweep.best_layer}: honest p = {sweep.max_statistic_p:.4f} (max over {len(sweep.layers)} layers)")
    if "PERSONA_GEOMETRY_RATES" not in os.environ:
        print("(made-up counts: the numbers above illustrate the output, they are not a result)")
