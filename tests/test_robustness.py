"""Robustness statistics against closed-form formulas written here and scipy."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from persona_geometry.analysis import (
    SCHEMA,
    analyze,
    partial_spearman,
    pool_seeds,
    robustness_at_layer,
    wilson_interval,
)

Z = stats.norm.ppf(0.975)


def _study(seed=0, P=12):
    rng = np.random.default_rng(seed)
    names = [f"p{i}" for i in range(P)]
    x = rng.uniform(-0.6, 0.9, P)
    n = rng.integers(60, 120, P)
    k = np.clip(np.round((0.55 - 0.45 * x + rng.normal(0, 0.07, P)) * n), 0, n).astype(int)
    cats = (["occupational"] * 5 + ["character"] * 5 + ["generic"] * P)[:P]
    tokens = rng.integers(20, 80, P)
    return names, x, k, n, cats, tokens


def _ols_by_hand(x, y):
    """Slope, intercept, residual variance, Sxx, xbar of a simple regression, from the formulas."""
    xbar, ybar = x.mean(), y.mean()
    sxx = ((x - xbar) ** 2).sum()
    slope = ((x - xbar) * (y - ybar)).sum() / sxx
    intercept = ybar - slope * xbar
    resid = y - intercept - slope * x
    s2 = (resid**2).sum() / (len(x) - 2)
    return slope, intercept, s2, sxx, xbar, resid


def _pi_by_hand(x, y, x0, alpha=0.05):
    slope, intercept, s2, sxx, xbar, _ = _ols_by_hand(x, y)
    t = stats.t.ppf(1 - alpha / 2, len(x) - 2)
    se = np.sqrt(s2 * (1 + 1 / len(x) + (x0 - xbar) ** 2 / sxx))
    pred = intercept + slope * x0
    return pred, pred - t * se, pred + t * se


def test_fit_holdout_prediction_intervals_and_headline_match_formulas():
    names, x, k, n, cats, _ = _study()
    rate = k / n
    holdout = ["p3", "p8"]
    res = robustness_at_layer(x, k=k, n=n, personas=names, categories=cats, holdout=holdout, layer=15)
    fit_mask = np.array([p not in holdout for p in names])
    lr = stats.linregress(x[fit_mask], rate[fit_mask])
    assert res.fit.slope == pytest.approx(lr.slope, rel=1e-10)
    assert res.fit.intercept == pytest.approx(lr.intercept, rel=1e-10)
    assert res.fit.r2 == pytest.approx(lr.rvalue**2, rel=1e-10)
    assert res.fit.slope_p == pytest.approx(lr.pvalue, rel=1e-8)
    assert res.fit.n == 10
    # Headline correlations use every persona, held-out ones included.
    assert res.correlation.pearson_r == pytest.approx(stats.pearsonr(x, rate).statistic, abs=1e-12)
    assert res.correlation.spearman_p == pytest.approx(stats.spearmanr(x, rate).pvalue, rel=1e-9)
    for h in res.holdout:
        i = names.index(h.persona)
        pred, lo, hi = _pi_by_hand(x[fit_mask], rate[fit_mask], x[i])
        assert (h.predicted, h.pi_lower, h.pi_upper) == pytest.approx((pred, lo, hi), rel=1e-9)
        assert h.observed == rate[i] and h.inside == (lo <= rate[i] <= hi)


def test_leave_one_out_coverage_matches_a_loop():
    names, x, k, n, cats, _ = _study(seed=4, P=10)
    rate = k / n
    rate[2] = 0.98  # a held-out persona far off the line: some refits will miss it
    holdout = ["p2", "p7"]
    res = robustness_at_layer(x, rate, personas=names, holdout=holdout)
    fit_idx = [i for i, p in enumerate(names) if p not in holdout]
    covered = total = 0
    for drop in fit_idx:
        idx = [i for i in fit_idx if i != drop]
        for h in (2, 7):
            _, lo, hi = _pi_by_hand(x[idx], rate[idx], x[h])
            covered += lo <= rate[h] <= hi
            total += 1
    assert (res.loo_coverage.covered, res.loo_coverage.total) == (covered, total)
    assert total == 16 and 0 < covered < total


def test_cooks_distance_threshold_and_without_most_influential_match_formulas():
    names, x, k, n, cats, _ = _study(seed=1)
    rate = k / n
    rate[0] = 0.0
    x[0] = 1.0  # a high-leverage reference-like point
    res = robustness_at_layer(x, rate, personas=names)
    _, _, s2, sxx, xbar, resid = _ols_by_hand(x, rate)
    h = 1 / len(x) + (x - xbar) ** 2 / sxx
    cooks = resid**2 / (2 * s2) * h / (1 - h) ** 2
    np.testing.assert_allclose(res.influence.cooks_distance, cooks, rtol=1e-9)
    np.testing.assert_allclose(res.influence.leverage, h, rtol=1e-9)
    assert res.influence.threshold == pytest.approx(4 / 12)
    expected = [names[i] for i in np.argsort(-cooks) if cooks[i] > 4 / 12]
    assert list(res.influence.influential) == expected
    worst = int(np.argmax(cooks))
    assert res.influence.most_influential == names[worst]
    keep = np.arange(12) != worst
    w = res.influence.without_most_influential
    assert w.n == 11
    assert w.pearson_r == pytest.approx(stats.pearsonr(x[keep], rate[keep]).statistic, abs=1e-12)
    assert w.spearman_p == pytest.approx(stats.spearmanr(x[keep], rate[keep]).pvalue, rel=1e-9)
    frame = res.influence.to_frame()
    assert frame.above_threshold.sum() == len(expected)


def _partial_by_precision_matrix(x, y, z):
    """Rank partial correlation as pingouin computes it: from the inverse correlation matrix of ranks."""
    ranks = np.column_stack([stats.rankdata(v) for v in (x, y, z)])
    prec = np.linalg.inv(np.corrcoef(ranks, rowvar=False))
    r = -prec[0, 1] / np.sqrt(prec[0, 0] * prec[1, 1])
    n, n_cov = len(x), 1
    dof = n - 2 - n_cov
    t = r * np.sqrt(dof / (1 - r**2))
    return r, 2 * stats.t.sf(abs(t), dof)


def test_partial_spearman_and_vif_match_the_textbook_formulas():
    names, x, k, n, cats, tokens = _study(seed=2, P=14)
    rate = k / n
    z = np.log(tokens) + 0.8 * x  # a covariate correlated with x
    r_exp, p_exp = _partial_by_precision_matrix(x, rate, z)
    rho, p = partial_spearman(x, rate, z)
    assert rho == pytest.approx(r_exp, abs=1e-12)
    assert p == pytest.approx(p_exp, rel=1e-9)
    res = robustness_at_layer(x, rate, personas=names, covariate=z, covariate_name="log_n_tokens")
    assert res.partial_spearman.rho == pytest.approx(r_exp, abs=1e-12)
    r_xz = np.corrcoef(x, z)[0, 1]
    assert res.partial_spearman.vif == pytest.approx(1 / (1 - r_xz**2), rel=1e-9)


def test_within_category_fits_and_skips():
    names, x, k, n, cats, _ = _study(P=12)
    cats = ["a"] * 5 + ["b"] * 4 + ["c"] * 2 + ["d"]
    rate = k / n
    res = robustness_at_layer(x, rate, personas=names, categories=cats)
    by = {c.category: c for c in res.within_category}
    for cat, idx in (("a", slice(0, 5)), ("b", slice(5, 9))):
        assert by[cat].correlation.n == len(range(12)[idx])
        assert by[cat].correlation.pearson_r == pytest.approx(stats.pearsonr(x[idx], rate[idx]).statistic, abs=1e-12)
        assert by[cat].correlation.spearman_p == pytest.approx(stats.spearmanr(x[idx], rate[idx]).pvalue, rel=1e-9)
    assert by["c"].correlation is None and "fewer than 3" in by["c"].skipped
    assert by["d"].to_dict() == {"n": 1, "skipped": "fewer than 3 personas (n=1)"}


def test_wilson_intervals_match_the_closed_form():
    k = np.array([0, 3, 50, 99, 100])
    n = np.array([100, 40, 100, 100, 100])
    lo, hi = wilson_interval(k, n)
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z * np.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)
    np.testing.assert_allclose(lo, centre - half, atol=1e-12)
    np.testing.assert_allclose(hi, centre + half, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_contains_k_over_n_and_lies_in_unit_interval(kn):
    k, n = kn
    lo, hi = wilson_interval([k], [n])
    assert 0.0 <= lo[0] <= k / n <= hi[0] <= 1.0


def test_pooling_across_seeds_adds_counts_and_keeps_per_seed_rates():
    table = pd.DataFrame(
        {
            "persona": ["a", "b", "c", "a", "b", "c"],
            "seed": [1, 1, 1, 2, 2, 2],
            "k": [3, 10, 0, 5, 12, 1],
            "n": [20, 20, 20, 30, 20, 20],
        }
    )
    pooled = pool_seeds(table)
    assert pooled.personas == ("a", "b", "c")
    np.testing.assert_array_equal(pooled.k, [8, 22, 1])
    np.testing.assert_array_equal(pooled.n, [50, 40, 40])
    assert pooled.per_seed.loc["a", 2] == pytest.approx(5 / 30)
    assert pooled.to_dict()["b"]["per_seed"] == {"1": 0.5, "2": 0.6}
    frame = pooled.to_frame()
    assert list(frame.columns) == ["persona", "k", "n", "rate", "rate_seed_1", "rate_seed_2"]
    with pytest.raises(ValueError, match="one row per"):
        pool_seeds(pd.concat([table, table.iloc[:1]]))


def test_reference_fits_with_and_without_and_exclusion():
    names, x, k, n, cats, _ = _study(seed=6)
    x[0], k[0] = 1.0, 0
    rate = k / n
    res = robustness_at_layer(x, k=k, n=n, personas=names, reference="p0")
    assert res.without_reference.pearson_r == pytest.approx(stats.pearsonr(x[1:], rate[1:]).statistic, abs=1e-12)
    assert res.fit_without_reference.slope == pytest.approx(stats.linregress(x[1:], rate[1:]).slope, rel=1e-10)
    d = res.to_dict()
    assert d["without_reference"]["n"] == 11 and d["reference"] == "p0"
    ex = robustness_at_layer(x, k=k, n=n, personas=names, reference="p0", exclude_reference=True)
    assert ex.n_personas == 11 and "p0" not in ex.personas and ex.without_reference is None
    assert ex.correlation.spearman_rho == pytest.approx(stats.spearmanr(x[1:], rate[1:]).statistic, abs=1e-12)


def test_to_dict_follows_the_documented_schema():
    names, x, k, n, cats, tokens = _study()
    res = robustness_at_layer(x, k=k, n=n, personas=names, categories=cats, covariate=np.log(tokens), holdout=["p1"], reference="p0")
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    required = {
        "n_personas", "pearson", "spearman", "fit", "holdout", "loo_pi_coverage", "cooks_distance",
        "cooks_threshold", "influential", "without_most_influential", "partial_spearman", "within_category", "wilson",
    }  # fmt: skip
    assert required <= set(d)
    for key in d:
        assert key in SCHEMA, f"{key} is not documented in SCHEMA"
    assert set(d["pearson"]) == {"r", "p"} and set(d["spearman"]) == {"rho", "p"}
    assert {"slope", "intercept", "r2"} <= set(d["fit"])
    assert set(d["holdout"][0]) == {"persona", "x", "observed", "predicted", "pi_lower", "pi_upper", "inside"}
    assert set(d["loo_pi_coverage"]) == {"covered", "total"}
    assert set(d["without_most_influential"]) >= {"persona", "pearson", "spearman"}
    assert set(d["partial_spearman"]) >= {"rho", "p", "vif"}
    assert all(0 <= lo <= hi <= 1 for lo, hi in d["wilson"].values())
    assert all(0 <= r <= 1 for r in d["rates"].values())
    assert set(d["cooks_distance"]) == set(names) - {"p1"}
    frame = res.to_frame()
    assert len(frame) == 12 and frame.loc[frame.persona == "p1", "role"].item() == "holdout"
    assert "Leave-one-out" in res.summary()


def test_analyze_reads_a_table_with_default_log_token_covariate(tmp_path):
    names, x, k, n, cats, tokens = _study()
    table = pd.DataFrame({"persona": names, "cos_l15": x, "k": k, "n": n, "category": cats, "n_tokens": tokens})
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    res = analyze(path, x="cos_l15", k="k", n="n", category="category")
    assert res.partial_spearman is not None and res.partial_spearman.covariate == "log_n_tokens"
    r_exp, _ = _partial_by_precision_matrix(x, k / n, np.log(tokens))
    assert res.partial_spearman.rho == pytest.approx(r_exp, abs=1e-12)
    assert res.x_name == "cos_l15"
    # Seeds: two rows per persona pool into summed counts.
    seeds = pd.concat([table.assign(seed=1), table.assign(seed=2, k=table.k // 2)])
    pooled = analyze(seeds, x="cos_l15", k="k", n="n", seed_column="seed")
    np.testing.assert_array_equal(pooled.k, k + k // 2)
    np.testing.assert_array_equal(pooled.n, 2 * n)
    # The old name of the seed column still works, with a deprecation warning.
    with pytest.warns(DeprecationWarning, match="'seed' parameter of analyze is renamed 'seed_column'"):
        old = analyze(seeds, x="cos_l15", k="k", n="n", seed="seed")
    np.testing.assert_array_equal(old.k, pooled.k)
    with pytest.warns(DeprecationWarning, match="'seed' parameter of pool_seeds is renamed 'seed_column'"):
        np.testing.assert_array_equal(pool_seeds(seeds, seed="seed").k, pooled.k)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.iloc[:2], "at least 3 personas"),
        (lambda t: t.assign(cos=0.5), "vary across personas"),
        (lambda t: t.assign(k=t.n // 2 * 0 + 5, n=10), "rates that vary"),
        (lambda t: t.assign(k=t.n + 1), r"k <= n"),
        (lambda t: t.assign(k=-1), "counts >= 0"),
        (lambda t: t.assign(cos=[np.nan] + list(t.cos[1:])), "finite numbers"),
        (lambda t: pd.concat([t, t.iloc[:1]]), "more than once"),
    ],
)
def test_bad_tables_raise_clear_errors(change, match):
    names, x, k, n, cats, _ = _study()
    table = pd.DataFrame({"persona": names, "cos": x, "k": k, "n": n})
    with pytest.raises(ValueError, match=match):
        analyze(change(table), x="cos", k="k", n="n")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(x="cosine"), r"'x' parameter.*Got 'cosine'"),
        (dict(category="cat"), "'category' parameter"),
        (dict(holdout=["nobody"]), "holdout"),
        (dict(reference="nobody"), "reference"),
    ],
)
def test_missing_columns_and_personas_are_named(kwargs, match):
    names, x, k, n, cats, _ = _study()
    table = pd.DataFrame({"persona": names, "cos": x, "k": k, "n": n})
    args = dict(x="cos", k="k", n="n")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        analyze(table, **args)


def test_held_out_fit_needs_three_personas_and_nan_rates_are_rejected():
    names, x, k, n, cats, _ = _study(P=5)
    with pytest.raises(ValueError, match="at least 3 to fit"):
        robustness_at_layer(x, k / n, personas=names, holdout=["p0", "p1", "p2"])
    rate = k / n
    rate[1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        robustness_at_layer(x, rate, personas=names)


def test_rates_without_counts_have_no_wilson_and_cosine_to_reference_input():
    import torch

    from persona_geometry.geometry import CosineToReference

    names, x, k, n, cats, _ = _study(P=6)
    rate = k / n
    table = pd.DataFrame({"persona": names, "cos": x, "rate": rate})
    res = analyze(table, x="cos", rate="rate")
    d = res.to_dict()
    assert d["wilson"] == {} and d["k"] is None and d["rates"]["p2"] == pytest.approx(rate[2])
    values = torch.tensor(np.column_stack([x, -x]))
    cos = CosineToReference(values=values, personas=tuple(names), categories=tuple(cats[:6]), layers=(3, 9), reference="p0", centered_on=None)
    at9 = robustness_at_layer(cos, rate, layer=9)
    assert at9.layer == 9 and at9.reference == "p0" and at9.categories == tuple(cats[:6])
    assert at9.correlation.pearson_r == pytest.approx(-stats.pearsonr(x, rate).statistic, abs=1e-12)
    assert at9.without_reference.n == 5


def test_without_most_influential_at_three_personas_reports_no_correlation():
    res = robustness_at_layer([0.1, 0.2, 0.5], [0.0, 0.1, 0.3], personas=["a", "b", "c"])
    d = res.to_dict()["without_most_influential"]
    assert d["n"] == 2 and d["pearson"] == {"r": None, "p": None} and d["spearman"] == {"rho": None, "p": None}
