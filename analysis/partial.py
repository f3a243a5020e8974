"""Rank partial correlation of rate and x controlling for a covariate, and their VIF."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from persona_geometry.stats import clip_r, json_float, p_from_r, rank, standardize

__all__ = ["PartialSpearman", "partial_spearman", "vif"]


@dataclass(frozen=True, kw_only=True)
class PartialSpearman:
    """Rank partial correlation of rate and x controlling for a covariate, with their VIF."""

    rho: float
    p: float
    vif: float
    n: int
    covariate: str

    def to_dict(self) -> dict[str, Any]:
        """Returns ``{rho, p, vif, n, covariate}``."""
        return {
            "rho": json_float(self.rho),
            "p": json_float(self.p),
            "vif": json_float(self.vif),
            "n": self.n,
            "covariate": self.covariate,
        }


def partial_spearman(x: np.ndarray, y: np.ndarray, covariate: np.ndarray) -> tuple[float, float]:
    """Returns the rank partial correlation of ``x`` and ``y`` given ``covariate``, and its p-value.

    The three variables are ranked; ranks of ``x`` and ``y`` are regressed on the covariate's
    ranks (with an intercept) and the residuals correlated. The p-value is the t-test with
    ``n - 3`` degrees of freedom (one covariate), as in the usual partial-correlation test.
    """
    rx, ry, rz = (
        rank(np.asarray(x, float)),
        rank(np.asarray(y, float)),
        rank(np.asarray(covariate, float)),
    )
    design = np.column_stack([np.ones_like(rz), rz])
    res_x = rx - design @ np.linalg.lstsq(design, rx, rcond=None)[0]
    res_y = ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]
    sx, sy = standardize(res_x), standardize(res_y)
    if np.isnan(sx).any() or np.isnan(sy).any():
        return math.nan, math.nan
    rho = float(clip_r(sx @ sy))
    return rho, float(p_from_r(rho, len(x) - 3))


def vif(x: np.ndarray, covariate: np.ndarray) -> float:
    """Returns the variance inflation factor of ``x`` given ``covariate`` (statsmodels)."""
    from statsmodels.stats.outliers_influence import variance_inflation_factor

    exog = np.column_stack([np.ones_like(x), x, covariate])
    with np.errstate(divide="ignore"):
        return float(variance_inflation_factor(exog, 1))
