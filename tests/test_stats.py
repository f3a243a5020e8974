"""Shared statistics primitives against scipy and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from persona_geometry.stats import bonferroni, correlate, holm, p_from_r, pearson, spearman


def test_vectorised_correlations_match_scipy_one_layer_at_a_time():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 5)), rng.normal(size=9)
    r, p = correlate(x, y[:, None], axis=0)
    for j in range(5):
        ref = stats.pearsonr(x[:, j], y)
        assert r[j] == pytest.approx(ref.statistic, abs=1e-14) and p[j] == pytest.approx(ref.pvalue, rel=1e-12)
        rho, p_rho = spearman(x[:, j], y)
        ref = stats.spearmanr(x[:, j], y)
        assert rho == pytest.approx(ref.statistic, abs=1e-14) and p_rho == pytest.approx(ref.pvalue, rel=1e-9)
    # p_from_r (kept for other degrees of freedom) is scipy's null distribution at df = n - 2.
    np.testing.assert_allclose(p_from_r(r, 9 - 2), p, rtol=1e-9)


@pytest.mark.parametrize("n", [3, 4, 7, 20])
def test_a_perfect_correlation_is_exactly_one_with_p_zero(n):
    x = np.linspace(0.1, 0.9, n) ** 2
    assert pearson(x, 3 * x + 0.2) == (1.0, 0.0)
    assert pearson(x, -x) == (-1.0, 0.0)
    assert spearman(x, np.exp(x)) == (1.0, 0.0)  # monotone: ranks agree exactly
    assert np.isnan(pearson(x, np.full(n, 0.5))).all()  # constant input: undefined


def test_corrections_are_the_hand_computed_bonferroni_and_holm():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.01])
    np.testing.assert_allclose(bonferroni(p), [0.05, 0.2, 0.15, 1.0, 0.05])
    # Holm by hand: sorted 0.01, 0.01, 0.03, 0.04, 0.2 times 5, 4, 3, 2, 1, then running max.
    np.testing.assert_allclose(holm(p), [0.05, 0.09, 0.09, 0.2, 0.05])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40), st.booleans())
def test_holm_equals_statsmodels_to_the_last_bit(p, ties):
    from statsmodels.stats.multitest import multipletests

    p = np.array(p + p[: len(p) // 2] if ties else p)  # repeated values exercise the order of ties
    np.testing.assert_array_equal(holm(p), multipletests(p, method="holm")[1])
