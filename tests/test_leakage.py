"""Pairwise leakage vs pairwise cosine: correlations against scipy, Mantel p against exact enumeration."""

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from persona_geometry.analysis import leakage_correlation
from persona_geometry.geometry import PairwiseCosine


def _geometry(seed=0, m=5, L=3):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(L, m, 6))
    unit = vecs / np.linalg.norm(vecs, axis=-1, keepdims=True)
    cos = np.einsum("lpd,lqd->lpq", unit, unit)
    names = [f"p{i}" for i in range(m)]
    return cos, names, rng


def _leakage_from(cos_layer, sources, targets, names, rng, noise=0.05):
    """Leakage that rises with cosine at one layer, plus noise and a direction asymmetry."""
    leak = np.zeros((len(sources), len(targets)))
    for i, s in enumerate(sources):
        for j, t in enumerate(targets):
            leak[i, j] = 0.3 + 0.2 * cos_layer[names.index(s), names.index(t)] + rng.normal(0, noise)
    return pd.DataFrame(leak, index=sources, columns=targets)


def _exact_mantel(cos, names, leak_frame, symmetric=False):
    """p-values over every relabelling of the personas (identity included), by explicit loops."""
    sources, targets = list(leak_frame.index), list(leak_frame.columns)
    if symmetric:
        both = [p for p in names if p in sources and p in targets]
        pairs = [(a, b, 0.5 * (leak_frame.loc[a, b] + leak_frame.loc[b, a])) for a, b in itertools.combinations(both, 2)]
    else:
        pairs = [(s, t, leak_frame.loc[s, t]) for s in sources for t in targets if s != t]
    values = np.array([p[2] for p in pairs])
    universe = [p for p in names if p in sources or p in targets]
    index = {p: names.index(p) for p in universe}
    out = []
    for layer in range(cos.shape[0]):
        def stat(perm, fn, layer=layer):
            relabel = dict(zip(universe, perm, strict=True))
            c = [cos[layer, index[relabel[a]], index[relabel[b]]] for a, b, _ in pairs]
            return fn(c, values).statistic

        obs_r, obs_rho = stat(universe, stats.pearsonr), stat(universe, stats.spearmanr)
        perms = list(itertools.permutations(universe))
        p_r = np.mean([abs(stat(p, stats.pearsonr)) >= abs(obs_r) - 1e-10 for p in perms])
        p_rho = np.mean([abs(stat(p, stats.spearmanr)) >= abs(obs_rho) - 1e-10 for p in perms])
        out.append((obs_r, p_r, obs_rho, p_rho))
    return np.array(out)


def test_directed_correlations_match_scipy_over_off_diagonal_pairs():
    cos, names, rng = _geometry(m=6, L=4)
    leak = _leakage_from(cos[2], names, names, names, rng)
    res = leakage_correlation(leak, cos, personas=names, n_permutations=50)
    assert res.n_directed == 30 and res.n_symmetric == 15
    for layer in range(4):
        c = [cos[layer, i, j] for i in range(6) for j in range(6) if i != j]
        v = [leak.iloc[i, j] for i in range(6) for j in range(6) if i != j]
        assert res.directed[layer, 0] == pytest.approx(stats.pearsonr(c, v).statistic, abs=1e-12)
        assert res.directed[layer, 2] == pytest.approx(stats.spearmanr(c, v).statistic, abs=1e-12)
        cs = [cos[layer, i, j] for i, j in itertools.combinations(range(6), 2)]
        vs = [0.5 * (leak.iloc[i, j] + leak.iloc[j, i]) for i, j in itertools.combinations(range(6), 2)]
        assert res.symmetric[layer, 2] == pytest.approx(stats.spearmanr(cs, vs).statistic, abs=1e-12)


@pytest.mark.parametrize("subset", [False, True])
def test_mantel_p_values_match_exact_enumeration(subset):
    cos, names, rng = _geometry(seed=3, m=5, L=2)
    sources = ["p0", "p1", "p3"] if subset else names
    leak = _leakage_from(cos[1], sources, names, names, rng, noise=0.08)
    exact = _exact_mantel(cos, names, leak)
    B = 3000
    res = leakage_correlation(leak, cos, personas=names, n_permutations=B, seed=7)
    for col in (1, 3):
        for layer in range(2):
            p = exact[layer, col]
            tol = 4 * math.sqrt(p * (1 - p) / B) + 3 / B
            assert abs(res.directed[layer, col] - p) < tol, (layer, col, res.directed[layer, col], p)
    if subset:
        exact_sym = _exact_mantel(cos, names, leak, symmetric=True)
        assert res.n_symmetric == 3
        p = exact_sym[1, 3]
        assert abs(res.symmetric[1, 3] - p) < 4 * math.sqrt(p * (1 - p) / B) + 3 / B


def test_pairwise_cosine_input_frame_dict_and_summary():
    cos, names, rng = _geometry(m=5, L=3)
    leak = _leakage_from(cos[0], names[:3], names, names, rng)
    pc = PairwiseCosine(values=torch.tensor(cos), personas=tuple(names), layers=(3, 6, 9), centered_on=None)
    res = leakage_correlation(leak, pc, n_permutations=200)
    assert res.layers == (3, 6, 9)
    frame = res.to_frame()
    assert list(frame.layer) == [3, 6, 9] and "directed_spearman_p_mantel" in frame and "symmetric_pearson_r" in frame
    assert ((frame.directed_pearson_p_mantel > 0) & (frame.directed_pearson_p_mantel <= 1)).all()
    json.dumps(res.to_dict(), allow_nan=False)
    assert 0 < res.max_p_directed <= 1
    assert "directed (12 pairs)" in res.summary()


def test_leakage_errors_name_the_problem():
    cos, names, rng = _geometry(m=4, L=2)
    leak = _leakage_from(cos[0], names, names, names, rng)
    with pytest.raises(ValueError, match="sources"):
        leakage_correlation(leak.rename(index={"p0": "zz"}), cos, personas=names)
    bad = leak.copy()
    bad.iloc[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        leakage_correlation(bad, cos, personas=names)
    with pytest.raises(ValueError, match="vary"):
        leakage_correlation(leak * 0 + 0.2, cos, personas=names)
    with pytest.raises(ValueError, match="shaped"):
        leakage_correlation(leak, cos[:, :3, :3], personas=names)
