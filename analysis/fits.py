"""Correlations and OLS fits of rate on x, with prediction intervals for held-out personas.

``Correlation`` holds Pearson and Spearman with their p-values (scipy); ``LinearFit`` an OLS fit
(statsmodels); ``HoldoutPrediction`` a held-out persona against the prediction interval of a
fit that excluded it, and ``LooCoverage`` how often that holds when each fitted persona is
dropped in turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from persona_geometry.stats import correlation_dict, json_float, pearson, spearman

__all__ = [
    "Correlation",
    "HoldoutPrediction",
    "LinearFit",
    "LooCoverage",
    "correlation",
    "holdout_predictions",
    "linear_fit",
    "loo_coverage",
    "ols",
    "prediction_intervals",
]


@dataclass(frozen=True, kw_only=True)
class Correlation:
    """Pearson and Spearman correlation of two per-persona vectors, with two-sided p-values."""

    n: int
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float

    def to_dict(self) -> dict[str, Any]:
        """Returns ``{n, pearson {r, p}, spearman {rho, p}}`` (NaN as None)."""
        return {
            "n": self.n,
            "pearson": correlation_dict(self.pearson_r, self.pearson_p),
            "spearman": correlation_dict(self.spearman_rho, self.spearman_p, name="rho"),
        }


@dataclass(frozen=True, kw_only=True)
class LinearFit:
    """An OLS fit ``rate = intercept + slope * x`` over ``personas``."""

    personas: tuple[str, ...]
    slope: float
    intercept: float
    r2: float
    slope_p: float

    @property
    def n(self) -> int:
        """The number of personas fitted."""
        return len(self.personas)

    def to_dict(self) -> dict[str, Any]:
        """Returns ``{slope, intercept, r2, n, slope_p}``."""
        return {
            "slope": json_float(self.slope),
            "intercept": json_float(self.intercept),
            "r2": json_float(self.r2),
            "n": self.n,
            "slope_p": json_float(self.slope_p),
        }


@dataclass(frozen=True, kw_only=True)
class HoldoutPrediction:
    """A held-out persona's observed rate against the prediction of a fit that excluded it."""

    persona: str
    x: float
    observed: float
    predicted: float
    pi_lower: float
    pi_upper: float

    @property
    def inside(self) -> bool:
        """Whether the observed rate lies inside the prediction interval."""
        return bool(self.pi_lower <= self.observed <= self.pi_upper)

    def to_dict(self) -> dict[str, Any]:
        """Returns ``{persona, x, observed, predicted, pi_lower, pi_upper, inside}``."""
        return {
            "persona": self.persona,
            "x": json_float(self.x),
            "observed": json_float(self.observed),
            "predicted": json_float(self.predicted),
            "pi_lower": json_float(self.pi_lower),
            "pi_upper": json_float(self.pi_upper),
            "inside": self.inside,
        }


@dataclass(frozen=True, kw_only=True)
class LooCoverage:
    """Leave-one-out coverage of held-out personas by refitted prediction intervals.

    Attributes:
        covered: (dropped persona, held-out persona) cases where the held-out rate stayed inside.
        total: Number of cases (fitted personas × held-out personas).
        cases: ``(dropped, held_out, inside)`` for every case.
    """

    covered: int
    total: int
    cases: tuple[tuple[str, str, bool], ...] = ()

    def to_dict(self) -> dict[str, int]:
        """Returns ``{covered, total}``."""
        return {"covered": self.covered, "total": self.total}


def correlation(x: np.ndarray, y: np.ndarray) -> Correlation:
    """Returns Pearson and Spearman of two vectors (NaN below 3 points)."""
    if len(x) < 3:  # two points always sit on a line: no correlation to report
        return Correlation(
            n=len(x),
            pearson_r=math.nan,
            pearson_p=math.nan,
            spearman_rho=math.nan,
            spearman_p=math.nan,
        )
    r, pr = pearson(x, y)
    rho, prho = spearman(x, y)
    return Correlation(n=len(x), pearson_r=r, pearson_p=pr, spearman_rho=rho, spearman_p=prho)


def ols(x: np.ndarray, y: np.ndarray) -> Any:
    """Returns the statsmodels OLS results of ``y`` on ``x`` with an intercept."""
    import statsmodels.api as sm

    return sm.OLS(y, np.column_stack([np.ones_like(x), x])).fit()


def linear_fit(x: np.ndarray, y: np.ndarray, personas: Sequence[str]) -> tuple[LinearFit, Any]:
    """Returns the ``LinearFit`` of ``y`` on ``x`` and the statsmodels results behind it."""
    res = ols(x, y)
    fit = LinearFit(
        personas=tuple(personas),
        slope=float(res.params[1]),
        intercept=float(res.params[0]),
        r2=float(res.rsquared),
        slope_p=float(res.pvalues[1]),
    )
    return fit, res


def prediction_intervals(res: Any, x_new: np.ndarray, alpha: float) -> pd.DataFrame:
    """Returns statsmodels' prediction summary frame (mean, obs_ci_lower, obs_ci_upper)."""
    exog = np.column_stack([np.ones_like(x_new), x_new])
    return res.get_prediction(exog).summary_frame(alpha=alpha)


def loo_coverage(
    x: np.ndarray,
    y: np.ndarray,
    names: list[str],
    fit_idx: list[int],
    hold_idx: list[int],
    alpha: float,
) -> LooCoverage:
    """Drops each fitted persona in turn, refits, and checks every held-out persona's interval."""
    if not hold_idx or len(fit_idx) - 1 < 3:
        return LooCoverage(covered=0, total=0)
    cases = []
    for drop in fit_idx:
        idx = [i for i in fit_idx if i != drop]
        if np.ptp(x[idx]) == 0:
            continue  # no slope can be fitted without it; the case is not counted
        frame = prediction_intervals(ols(x[idx], y[idx]), x[hold_idx], alpha)
        for row, h in enumerate(hold_idx):
            inside = bool(
                frame["obs_ci_lower"].iloc[row] <= y[h] <= frame["obs_ci_upper"].iloc[row]
            )
            cases.append((names[drop], names[h], inside))
    return LooCoverage(covered=sum(c[2] for c in cases), total=len(cases), cases=tuple(cases))


def holdout_predictions(
    res: Any,
    x: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    hold_idx: Sequence[int],
    alpha: float,
) -> tuple[HoldoutPrediction, ...]:
    """Returns each held-out persona's observed rate against the fit's prediction interval."""
    if not hold_idx:
        return ()
    frame = prediction_intervals(res, x[list(hold_idx)], alpha)
    return tuple(
        HoldoutPrediction(
            persona=names[i],
            x=float(x[i]),
            observed=float(y[i]),
            predicted=float(frame["mean"].iloc[row]),
            pi_lower=float(frame["obs_ci_lower"].iloc[row]),
            pi_upper=float(frame["obs_ci_upper"].iloc[row]),
        )
        for row, i in enumerate(hold_idx)
    )
