"""The layer sweep against scipy/statsmodels, explicit loops and exact permutation enumeration."""

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.multitest import multipletests

from persona_geometry import LayerSweep, layer_sweep
from persona_geometry.geometry import CosineToReference


def _data(seed=0, P=15, L=6, signal_layer=3, strength=0.9):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(P, L))
    y = np.clip(0.5 - 0.2 * strength * x[:, min(signal_layer, L - 1)] + rng.normal(0, 0.05, P), 0, 1)
    y[:3] = 0.0  # tied rates, as real marker rates have
    return x, y


def test_per_layer_statistics_match_scipy():
    x, y = _data()
    s = layer_sweep(x, y, n_permutations=0, n_bootstrap=0)
    for j in range(x.shape[1]):
        pr = stats.pearsonr(x[:, j], y)
        sr = stats.spearmanr(x[:, j], y)
        assert s.pearson_r[j] == pytest.approx(pr.statistic, abs=1e-12)
        assert s.pearson_p[j] == pytest.approx(pr.pvalue, rel=1e-9, abs=1e-300)
        assert s.spearman_rho[j] == pytest.approx(sr.statistic, abs=1e-12)
        assert s.spearman_p[j] == pytest.approx(sr.pvalue, rel=1e-9, abs=1e-300)
    assert s.best_layer == 3
    assert s.max_statistic == pytest.approx(abs(stats.spearmanr(x[:, 3], y).statistic))
    assert math.isnan(s.max_statistic_p)


def test_corrections_match_statsmodels_multipletests():
    x, y = _data(seed=3, P=10, L=9, strength=0.5)
    s = layer_sweep(x, y, n_permutations=0, n_bootstrap=0)
    for p, bonf, holm in ((s.pearson_p, s.pearson_p_bonferroni, s.pearson_p_holm), (s.spearman_p, s.spearman_p_bonferroni, s.spearman_p_holm)):
        np.testing.assert_allclose(bonf, multipletests(p, method="bonferroni")[1], rtol=1e-12)
        np.testing.assert_allclose(holm, multipletests(p, method="holm")[1], rtol=1e-12)


def test_primary_layer_is_reported_whatever_the_sweep_finds():
    x, y = _data()
    s = layer_sweep(x, y, primary_layer=1, n_permutations=0, n_bootstrap=0, layers=[10, 1, 12, 13, 14, 15])
    # The columns are labelled [10, 1, 12, ...]: column 1 is layer 1, column 3 (the signal) is 13.
    assert s.best_layer == 13 and s.primary_layer == 1
    assert s.primary["spearman"]["rho"] == pytest.approx(stats.spearmanr(x[:, 1], y).statistic)
    assert s.to_dict()["primary"]["layer"] == 1
    frame = s.to_frame()
    assert frame.loc[frame.is_primary, "layer"].tolist() == [1]
    assert frame.loc[frame.is_best, "layer"].tolist() == [13]
    assert s.summary().splitlines()[1].startswith("Primary result, layer 1 (declared in advance)")


def test_bootstrap_intervals_match_an_explicit_resampling_loop():
    rng = np.random.default_rng(5)
    P, L, B = 9, 4, 150
    x = rng.normal(size=(P, L))
    x[2, 1] = x[5, 1]  # a tie inside one layer
    x[:, 2] = np.round(x[:, 2])  # a layer with many ties
    y = np.round(rng.uniform(size=P), 1)
    y[:2] = 0.0
    s = layer_sweep(x, y, n_permutations=0, n_bootstrap=B, seed=11, confidence=0.9)
    # The documented stream: SeedSequence(seed).spawn(2)[1], then integers(0, P, size=(B, P)).
    idx = np.random.default_rng(np.random.SeedSequence(11).spawn(2)[1]).integers(0, P, size=(B, P))
    boot_r = np.full((B, L), np.nan)
    boot_rho = np.full((B, L), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, i in enumerate(idx):
            for j in range(L):
                if np.ptp(x[i, j]) > 0 and np.ptp(y[i]) > 0:
                    boot_r[b, j] = stats.pearsonr(x[i, j], y[i]).statistic
                    boot_rho[b, j] = stats.spearmanr(x[i, j], y[i]).statistic
    np.testing.assert_allclose(s.pearson_ci, np.nanpercentile(boot_r, [5, 95], axis=0).T, atol=1e-10)
    np.testing.assert_allclose(s.spearman_ci, np.nanpercentile(boot_rho, [5, 95], axis=0).T, atol=1e-10)


def _exact_max_p(x, y, statistic):
    """The permutation p-value of max |stat| over layers, over all P! permutations (identity included).

    Written with numpy's corrcoef on every permutation at once; Spearman is Pearson on ranks.
    """
    if statistic == "spearman":
        x, y = stats.rankdata(x, axis=0), stats.rankdata(y)
    perms = np.array(list(itertools.permutations(range(len(y)))))
    ys = y[perms]  # [P!, P]
    corr = np.corrcoef(np.vstack([x.T, ys]))[: x.shape[1], x.shape[1] :]  # [layer, P!]
    maxima = np.abs(corr).max(axis=0)
    observed = maxima[0]  # the first permutation is the identity
    return float((maxima >= observed - 1e-10).mean())


@pytest.mark.parametrize("statistic", ["spearman", "pearson"])
def test_max_over_layers_permutation_p_matches_exact_enumeration(statistic):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 3))
    y = x[:, 1] * 0.5 + rng.normal(0, 0.6, 6)
    exact = _exact_max_p(x, y, statistic)
    B = 4000
    s = layer_sweep(x, y, n_permutations=B, n_bootstrap=0, seed=1, statistic=statistic)
    sd = math.sqrt(exact * (1 - exact) / B)
    assert abs(s.max_statistic_p - exact) < 4 * sd + 2 / B
    assert 0 < s.max_statistic_p <= 1
    # max-T p of the best layer is the max-statistic p; every layer's is at least as large.
    j = s.layers.index(s.best_layer)
    assert s.p_maxt[j] == pytest.approx(s.max_statistic_p)
    assert (s.p_maxt >= s.max_statistic_p - 1e-12).all()


def test_permutation_p_is_one_plus_count_over_one_plus_b():
    # A perfect monotone relation at 4 personas: only the identity and nothing else reaches |rho| = 1
    # except the reversal, so p = (1 + #hits) / (1 + B) with hits ~ 2/24 of B.
    x = np.array([[0.1], [0.2], [0.3], [0.4]])
    y = np.array([0.4, 0.3, 0.2, 0.1])
    B = 6000
    s = layer_sweep(x, y, n_permutations=B, n_bootstrap=0)
    hits = s.max_statistic_p * (1 + B) - 1
    assert hits == pytest.approx(round(hits))  # an integer count
    assert abs(hits / B - 2 / 24) < 4 * math.sqrt((2 / 24) * (22 / 24) / B)


@pytest.mark.slow
def test_permutation_test_is_calibrated_under_the_null():
    """Independent y: the max-over-layers p-value is uniform, so about 5% fall at or below 0.05."""
    rng = np.random.default_rng(123)
    reps, below = 200, 0
    for r in range(reps):
        x = rng.normal(size=(10, 5))
        x[:, 1] = x[:, 0] + rng.normal(0, 0.3, 10)  # correlated layers, as real ones are
        y = rng.uniform(size=10)
        s = layer_sweep(x, y, n_permutations=99, n_bootstrap=0, seed=r)
        below += s.max_statistic_p <= 0.05
    # Binomial(200, 0.05): mean 10, sd 3.1; the window is about 3 sd wide on each side.
    assert 1 <= below <= 20, below


def test_counts_give_rates_and_mappings_align_by_name():
    x, y = _data(P=8)
    n = np.full(8, 40)
    k = np.round(y * 40)
    names = [f"p{i}" for i in range(8)]
    by_counts = layer_sweep(x, k=k, n=n, personas=names, n_permutations=0, n_bootstrap=0)
    shuffled = {names[i]: k[i] / 40 for i in reversed(range(8))}
    by_map = layer_sweep(x, shuffled, personas=names, n_permutations=0, n_bootstrap=0)
    np.testing.assert_allclose(by_counts.spearman_rho, [stats.spearmanr(x[:, j], k / n).statistic for j in range(x.shape[1])], atol=1e-12)
    np.testing.assert_allclose(by_map.pearson_r, by_counts.pearson_r, atol=1e-12)


def test_cosine_to_reference_labels_and_reference_are_used():
    x, y = _data(P=7, L=3)
    x[0] = 1.0  # the reference: cosine 1 by construction
    names = tuple(f"p{i}" for i in range(7))
    cos = CosineToReference(values=torch.tensor(x), personas=names, categories=("c",) * 7, layers=(4, 8, 12), reference="p0", centered_on=None)
    s = layer_sweep(cos, y, n_permutations=100, n_bootstrap=50)
    assert s.layers == (4, 8, 12) and s.reference == "p0" and s.n_personas == 7
    w = s.without_reference
    assert isinstance(w, LayerSweep) and w.personas == names[1:]
    for j in range(3):
        assert w.spearman_rho[j] == pytest.approx(stats.spearmanr(x[1:, j], y[1:]).statistic, abs=1e-12)
        assert w.pearson_p[j] == pytest.approx(stats.pearsonr(x[1:, j], y[1:]).pvalue, rel=1e-9)
    frame = s.to_frame()
    assert "spearman_rho_without_reference" in frame and len(frame) == 3
    excluded = layer_sweep(cos, y, exclude=["p0"], n_permutations=0, n_bootstrap=0)
    assert excluded.without_reference is None and excluded.excluded == ("p0",)
    np.testing.assert_allclose(excluded.pearson_r, w.pearson_r, atol=1e-12)
    d = s.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["without_reference"]["n_personas"] == 6 and d["reference"] == "p0"


def test_dataframe_input_and_frame_dict_summary():
    import pandas as pd

    x, y = _data(P=6, L=4)
    wide = pd.DataFrame(x, index=[f"q{i}" for i in range(6)], columns=[0, 5, 10, 15])
    s = layer_sweep(wide, y, n_permutations=200, n_bootstrap=100)
    assert s.layers == (0, 5, 10, 15) and s.personas[0] == "q0"
    frame = s.to_frame()
    assert list(frame.layer) == [0, 5, 10, 15] and frame.shape[0] == 4
    assert {"pearson_r", "spearman_rho", "spearman_p_holm", "pearson_ci_low", "p_maxt"} <= set(frame.columns)
    text = json.dumps(s.to_dict(), allow_nan=False)
    assert '"max_statistic"' in text
    assert "Strongest layer" in s.summary()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(cosine=np.ones((2, 3)) * [[1], [2]], y=[0.1, 0.2]), "at least 3 personas"),
        (dict(y=[0.2] * 5), "rates that vary"),
        (dict(cosine=np.column_stack([np.arange(5.0), np.full(5, 0.3)])), r"constant cosine at layers \[1\]"),
        (dict(y=None, k=[1, 2, 3, 9, 1], n=[5] * 5), r"k <= n"),
        (dict(y=None, k=[1, -2, 3, 4, 1], n=[5] * 5), "counts >= 0"),
        (dict(y=[0.1, np.nan, 0.3, 0.4, 0.5]), "NaN"),
        (dict(cosine=np.array([[0.1, 0.2], [np.nan, 0.1], [0.3, 0.3], [0.2, 0.5], [0.0, 0.1]])), "finite values"),
        (dict(personas=["a", "b", "a", "c", "d"]), "unique names"),
        (dict(reference="zzz"), "reference"),
        (dict(exclude=["zzz"]), "exclude"),
        (dict(primary_layer=7), "primary_layer"),
        (dict(statistic="kendall"), "statistic"),
        (dict(y=[0.1, 0.2, 0.3]), "one per persona"),
    ],
)
def test_bad_input_names_the_problem(kwargs, match):
    rng = np.random.default_rng(0)
    args = dict(cosine=rng.normal(size=(5, 2)), y=[0.1, 0.5, 0.2, 0.9, 0.4], personas=None)
    args.update(kwargs)
    cosine = args.pop("cosine")
    y = args.pop("y")
    with pytest.raises((ValueError, TypeError), match=match):
        layer_sweep(cosine, y, n_permutations=0, n_bootstrap=0, **args)


finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=4, max_size=12, unique_by=lambda t: t[0]))
def test_spearman_is_invariant_under_monotone_transforms_of_x(pairs):
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    if np.ptp(y) == 0:
        return
    X = np.column_stack([x, np.arctan(x) * 3 + x**3])  # a strictly increasing transform
    s = layer_sweep(X, y, n_permutations=0, n_bootstrap=0)
    assert s.spearman_rho[0] == pytest.approx(s.spearman_rho[1], abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=4, max_size=12))
def test_pearson_sign_flips_when_x_is_negated(pairs):
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    if np.ptp(x) < 1e-3 or np.ptp(y) < 1e-3:
        return
    s = layer_sweep(np.column_stack([x, -x]), y, n_permutations=0, n_bootstrap=0)
    assert s.pearson_r[0] == pytest.approx(-s.pearson_r[1], abs=1e-9)
    assert s.pearson_p[0] == pytest.approx(s.pearson_p[1], rel=1e-6, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 9), st.integers(1, 4), st.integers(1, 60), st.integers(0, 2**31 - 1))
def test_permutation_p_values_lie_in_zero_one(P, L, B, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(P, L))
    y = rng.uniform(size=P)
    s = layer_sweep(x, y, n_permutations=B, n_bootstrap=0, seed=seed)
    assert 0 < s.max_statistic_p <= 1
    assert ((s.p_maxt > 0) & (s.p_maxt <= 1)).all()
    assert s.max_statistic_p >= 1 / (1 + B)


def test_perfect_correlation_at_three_personas_matches_scipy_exactly():
    x = np.array([[0.1, 0.3], [0.2, 0.1], [0.5, 0.2]])
    y = np.array([0.0, 0.1, 0.3])
    s = layer_sweep(x, y, n_permutations=0, n_bootstrap=0)
    sr = stats.spearmanr(x[:, 0], y)
    assert (s.spearman_rho[0], s.spearman_p[0]) == (sr.statistic, sr.pvalue) == (1.0, 0.0)


def test_three_personas_with_the_reference_still_sweep():
    import numpy as np

    from persona_geometry.analysis.sweep import layer_sweep

    cos = np.array([[1.0, 1.0], [0.2, -0.1], [-0.3, 0.4]])
    sweep = layer_sweep(cos, [0.1, 0.5, 0.8], personas=["ref", "a", "b"], reference="ref", n_permutations=10, n_bootstrap=0)
    assert sweep.n_personas == 3 and sweep.without_reference is None


def test_progress_false_turns_every_bar_off(monkeypatch):
    import persona_geometry.analysis.sweep as sweep_module

    seen = []
    real = sweep_module.tqdm

    def recording(*args, **kwargs):
        seen.append((kwargs["desc"], kwargs["disable"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "tqdm", recording)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.uniform(size=6)
    quiet = layer_sweep(x, y, n_permutations=20, n_bootstrap=10, progress=False)
    assert seen == [("permutations", True), ("bootstrap", True)]
    seen.clear()
    shown = layer_sweep(x, y, n_permutations=20, n_bootstrap=10)
    assert seen == [("permutations", None), ("bootstrap", None)]  # on a terminal only
    np.testing.assert_array_equal(quiet.p_maxt, shown.p_maxt)  # the bar changes nothing else
