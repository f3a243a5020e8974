"""Statistics primitives shared by every layer above the core: vectorised correlations, Wilson
intervals of counts, multiple-testing corrections and per-persona input checks.

Correlations and their p-values come from ``scipy.stats.pearsonr(..., axis=)`` (Spearman's rho
is Pearson's r of average ranks, as in ``scipy.stats.spearmanr``), a whole vector of layers at
once; Bonferroni from ``statsmodels.stats.multitest.multipletests``. What stays hand-written
is what the libraries do not offer: the unit-norm standardisation that turns a permutation or
bootstrap sweep into one matrix product, ``p_from_r`` for a correlation with other degrees of
freedom than ``n - 2`` (a partial correlation), and Holm's three lines, because statsmodels runs
a full garbage collection on every Holm call (checked bit for bit against it in the tests).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import special, stats

from persona_geometry._validation import check_probability, invalid
from persona_geometry.settings import (
    STATISTICS as STATISTICS,  # re-exported: sweep and leakage check against it
)

# Elements per chunk of vectorised permutation work: bounds memory to tens of MB whatever the
# number of personas, layers or resamples.
CHUNK_ELEMENTS = 1 << 22
# Two maxima that are equal in exact arithmetic may differ in the last bits after different
# summation orders; count them as ties (``>=``), as a permutation p-value requires.
TIE_TOL = 1e-10

# Per-persona inputs arrive as lists, numpy arrays, tensors, pandas Series or {name: value}
# mappings; ``per_persona`` validates and aligns them at run time, so the annotation stays open.
PerPersona = Any


def rank(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Returns average ranks (1-based, ties averaged) along ``axis``, as scipy's ``rankdata``."""
    return stats.rankdata(a, axis=axis)


def standardize(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Returns ``a`` centred along ``axis`` and scaled to unit L2 norm (NaN where constant).

    The dot product of two such vectors is their Pearson correlation, so a whole sweep over
    layers (or permutations) becomes one matrix product.
    """
    c = a - a.mean(axis=axis, keepdims=True)
    norm = np.sqrt((c * c).sum(axis=axis, keepdims=True))
    # Relative threshold: a column that is constant up to rounding is constant.
    scale = np.abs(a).max(axis=axis, keepdims=True) + 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 1e-12 * scale * math.sqrt(a.shape[axis]), c / norm, np.nan)


def clip_r(r: np.ndarray | float) -> np.ndarray:
    """Returns ``r`` clipped to [-1, 1], with values within 1e-12 of ±1 set to exactly ±1.

    A perfect (rank) correlation computed in floating point lands at 1 - 2e-16, whose p-value
    would be ~1e-8 at n = 3 instead of 0; scipy returns exactly ±1 there, and so does this.
    """
    r = np.clip(np.asarray(r, dtype=np.float64), -1.0, 1.0)
    return np.where(np.abs(r) > 1.0 - 1e-12, np.sign(r), r)


def p_from_r(
    r: np.ndarray | float | np.floating, df: np.ndarray | int | float | np.number
) -> np.ndarray:
    """Returns the two-sided p-value of correlation ``r`` with ``df`` degrees of freedom.

    The null distribution of ``scipy.stats.pearsonr``, ``p = I_{1 - r^2}(df / 2, 1 / 2)`` (the
    regularised incomplete beta function, ``2 * t.sf(|t|, df)`` written so that it stays exact
    at ``|r| = 1``), for the degrees of freedom scipy's function cannot be given: a partial
    correlation controlling for one covariate has ``df = n - 3``.
    """
    r = np.clip(np.asarray(r, dtype=np.float64), -1.0, 1.0)
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        p = special.betainc(df / 2.0, 0.5, np.clip(1.0 - r * r, 0.0, 1.0))
    return np.where(df > 0, p, np.nan)


def correlate(x: np.ndarray, y: np.ndarray, *, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns Pearson's ``(r, p)`` of ``x`` and ``y`` along ``axis`` (``scipy.stats.pearsonr``).

    ``x`` and ``y`` broadcast against each other (e.g. ``[persona, layer]`` against
    ``[persona, 1]``). A correlation within 1e-12 of ±1 is reported as exactly ±1 with p = 0,
    as scipy does for a perfect correlation at small n; where either input is constant (up to
    rounding) both are NaN.
    """
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    constant = np.isnan(standardize(x, axis)).any(axis=axis) | np.isnan(standardize(y, axis)).any(
        axis=axis
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        res = stats.pearsonr(x, y, axis=axis)
    r = clip_r(res.statistic)
    p = np.where(np.abs(r) == 1.0, 0.0, res.pvalue)
    return np.where(constant, np.nan, r), np.where(constant, np.nan, p)


def pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Returns Pearson's ``(r, p)`` of two vectors (NaN if either is constant)."""
    r, p = correlate(x, y)
    return float(r), float(p)


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Returns Spearman's ``(rho, p)`` of two vectors (NaN if either is constant)."""
    return pearson(rank(np.asarray(x, float)), rank(np.asarray(y, float)))


def bonferroni(p: np.ndarray) -> np.ndarray:
    """Returns Bonferroni-adjusted p-values (``min(m * p, 1)``) of a 1-D array (statsmodels)."""
    return _multipletests(p, "bonferroni")


def holm(p: np.ndarray) -> np.ndarray:
    """Returns Holm step-down adjusted p-values of a 1-D array, in the input order.

    The ``k``-th smallest of ``m`` p-values is multiplied by ``m - k`` (from 0), made
    non-decreasing and capped at 1: statsmodels' ``multipletests(method="holm")`` to the last
    bit (tested), without the ``gc.collect()`` statsmodels runs on every Holm call, which took
    0.1 s per call in a process holding a model, 0.9 s in the test suite.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        invalid("p", "holm", "a 1-D array of p-values", f"shape {p.shape}")
    order = np.argsort(p, kind="mergesort")
    adjusted = np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1))
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def _multipletests(p: np.ndarray, method: str) -> np.ndarray:
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        invalid("p", method, "a 1-D array of p-values", f"shape {p.shape}")
    if p.size == 0:
        return p.copy()
    return np.asarray(multipletests(p, method=method)[1], dtype=np.float64)


def correlation_dict(r: float, p: float, *, name: str = "r") -> dict[str, float | None]:
    """Returns ``{name: r, "p": p}`` with NaN turned into None (JSON-safe)."""
    return {name: json_float(r), "p": json_float(p)}


def json_float(value: Any) -> float | None:
    """Returns ``value`` as a float, or None where it is NaN/inf (JSON has no NaN)."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def per_persona(
    values: PerPersona,
    personas: Sequence[str],
    param: str,
    func: str,
    *,
    allow_none: bool = False,
) -> np.ndarray | None:
    """Returns ``values`` as a float64 vector aligned to ``personas``.

    Mappings and pandas Series with a string index are aligned by persona name; anything else
    must have one value per persona, in order. NaN or infinite values are rejected.
    """
    if values is None:
        if allow_none:
            return None
        invalid(param, func, "one value per persona", None, exc=TypeError)
    index = getattr(values, "index", None)
    if isinstance(values, Mapping) or (index is not None and not callable(index)):
        mapping = dict(values.items()) if not isinstance(values, Mapping) else dict(values)
        missing = [p for p in personas if p not in mapping]
        if missing:
            invalid(
                param,
                func,
                f"a value for every persona in {list(personas)}",
                f"no value for {missing}",
            )
        arr = np.array([_to_float(mapping[p], param, func) for p in personas], dtype=np.float64)
    else:
        if hasattr(values, "detach"):  # torch tensor
            values = values.detach().cpu().double().numpy()
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"The {param!r} parameter of {func} must be numbers, one per persona. "
                f"Got {values!r} instead."
            ) from e
        if arr.ndim != 1 or arr.shape[0] != len(personas):
            invalid(
                param,
                func,
                f"a 1-D sequence of {len(personas)} values (one per persona)",
                f"shape {arr.shape}",
            )
    bad = [personas[i] for i in np.flatnonzero(~np.isfinite(arr))]
    if bad:
        invalid(param, func, "finite numbers (no NaN or inf)", f"non-finite values for {bad}")
    check_magnitude(arr, personas, param, func)
    return arr


# Squares and products of values above ~1e154 overflow float64 (r = 0, p = 1 instead of the
# true correlation); no geometry measure, rate or count comes near this bound.
MAX_MAGNITUDE = 1e150


def check_magnitude(arr: np.ndarray, labels: Sequence[Any], param: str, func: str) -> None:
    """Raises ValueError if a value of ``arr`` exceeds ``MAX_MAGNITUDE`` in absolute value."""
    big = np.abs(arr) > MAX_MAGNITUDE
    if big.any():
        where = [labels[i] for i in np.flatnonzero(big.reshape(big.shape[0], -1).any(axis=1))]
        invalid(
            param,
            func,
            f"numbers of magnitude at most {MAX_MAGNITUDE:g} (larger ones overflow)",
            f"values beyond it for {where}",
        )


def _to_float(v: Any, param: str, func: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"The {param!r} parameter of {func} must be numbers. Got {v!r} instead."
        ) from e


def rates_from(
    y: PerPersona,
    k: PerPersona,
    n: PerPersona,
    personas: Sequence[str],
    func: str,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Returns ``(rate, k, n)``: rates given directly, or ``k / n`` from validated raw counts."""
    if y is not None and (k is not None or n is not None):
        invalid(
            "y",
            func,
            "given alone, or left None when raw counts k and n are given",
            "both y and k/n",
        )
    if y is None:
        if k is None or n is None:
            invalid(
                "k",
                func,
                "given together with n (or pass rates as y)",
                "k" if n is None else "n only",
                exc=TypeError,
            )
        k_arr = per_persona(k, personas, "k", func)
        n_arr = per_persona(n, personas, "n", func)
        check_counts(k_arr, n_arr, personas, func)
        return k_arr / n_arr, k_arr, n_arr
    rate = per_persona(y, personas, "y", func)
    outside = [personas[i] for i in np.flatnonzero((rate < 0) | (rate > 1))]
    if outside:
        invalid("y", func, "rates in [0, 1]", f"rates outside it for {outside}")
    return rate, None, None


def check_counts(k: np.ndarray, n: np.ndarray, personas: Sequence[str], func: str) -> None:
    """Raises ValueError unless ``0 <= k <= n``, ``n >= 1`` and both are whole numbers."""
    for name, arr in (("k", k), ("n", n)):
        frac = [personas[i] for i in np.flatnonzero(arr != np.round(arr))]
        if frac:
            invalid(name, func, "whole-number counts", f"fractional counts for {frac}")
    if (k < 0).any():
        invalid(
            "k",
            func,
            "counts >= 0",
            f"negative k for {[personas[i] for i in np.flatnonzero(k < 0)]}",
        )
    if (n < 1).any():
        invalid(
            "n", func, "counts >= 1", f"n < 1 for {[personas[i] for i in np.flatnonzero(n < 1)]}"
        )
    if (k > n).any():
        bad = {personas[i]: (int(k[i]), int(n[i])) for i in np.flatnonzero(k > n)}
        invalid("k", func, "at most n (k <= n)", f"k > n for {bad}")


def wilson_interval(
    k: PerPersona, n: PerPersona, *, alpha: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Returns Wilson score intervals ``(lower, upper)`` of ``k / n`` (statsmodels).

    Raises:
        ValueError: If ``k > n``, ``k < 0``, ``n < 1``, or counts are not whole numbers.
    """
    from statsmodels.stats.proportion import proportion_confint

    k_arr = np.atleast_1d(np.asarray(k, dtype=np.float64))
    n_arr = np.atleast_1d(np.asarray(n, dtype=np.float64))
    if k_arr.shape != n_arr.shape:
        invalid("n", "wilson_interval", f"the same shape as k {k_arr.shape}", n_arr.shape)
    names = [str(i) for i in range(k_arr.size)]
    check_counts(k_arr.ravel(), n_arr.ravel(), names, "wilson_interval")
    lo, hi = proportion_confint(
        k_arr, n_arr, alpha=check_probability(alpha, "alpha", "wilson_interval"), method="wilson"
    )
    # The bounds are exactly 0 at k = 0 and 1 at k = n; rounding can leave them a hair off
    # (3e-18), which would put k / n outside its own interval.
    p = k_arr / n_arr
    lo = np.where(k_arr == 0, 0.0, np.minimum(np.clip(np.asarray(lo, float), 0.0, 1.0), p))
    hi = np.where(k_arr == n_arr, 1.0, np.maximum(np.clip(np.asarray(hi, float), 0.0, 1.0), p))
    return lo, hi


def wilson_bounds(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Returns the Wilson score interval of one count ``k`` of ``n`` as two floats."""
    low, high = wilson_interval([k], [n], alpha=alpha)
    return float(low[0]), float(high[0])


def check_rates(values: np.ndarray, personas: Sequence[Any], param: str, func: str) -> None:
    """Raises ValueError naming the first personas whose rate lies outside [0, 1] (fractions)."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~((values >= 0) & (values <= 1))
    if bad.any():
        names = np.asarray(personas, dtype=object)[bad][:3]
        shown = {str(p): float(v) for p, v in zip(names, values[bad][:3], strict=True)}
        invalid(param, func, "rates in [0, 1] (fractions, not percentages)", shown)
