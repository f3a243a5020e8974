"""Influence of each fitted persona on the OLS fit: Cook's distance, leverage, the 4/N rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from persona_geometry.analysis.fits import Correlation, correlation
from persona_geometry.stats import json_float

__all__ = ["Influence", "influence"]


@dataclass(frozen=True, kw_only=True, eq=False)
class Influence:
    """Influence of each fitted persona on the OLS fit (statsmodels ``OLSInfluence``).

    Attributes:
        personas: The fitted personas.
        cooks_distance: Cook's distance per persona.
        leverage: Diagonal of the hat matrix.
        studentized_residuals: Externally studentized residuals.
        threshold: The conventional 4 / N cut-off.
        influential: Personas above the threshold, largest distance first.
        most_influential: The persona with the largest Cook's distance.
        without_most_influential: Headline correlations recomputed without it.
    """

    personas: tuple[str, ...]
    cooks_distance: Float[np.ndarray, " persona"]
    leverage: Float[np.ndarray, " persona"]
    studentized_residuals: Float[np.ndarray, " persona"]
    threshold: float
    influential: tuple[str, ...]
    most_influential: str
    without_most_influential: Correlation

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per fitted persona.

        Columns: persona, cooks_distance, leverage, studentized_residual, above_threshold.
        """
        return pd.DataFrame(
            {
                "persona": list(self.personas),
                "cooks_distance": self.cooks_distance,
                "leverage": self.leverage,
                "studentized_residual": self.studentized_residuals,
                "above_threshold": self.cooks_distance > self.threshold,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the schema's cooks_distance, cooks_threshold, influential and
        without_most_influential entries."""
        return {
            "cooks_distance": {
                p: json_float(d) for p, d in zip(self.personas, self.cooks_distance, strict=True)
            },
            "cooks_threshold": json_float(self.threshold),
            "influential": list(self.influential),
            "without_most_influential": {
                "persona": self.most_influential,
                **self.without_most_influential.to_dict(),
            },
        }

    def summary(self) -> str:
        """Returns one line on influence."""
        w = self.without_most_influential
        named = f" ({', '.join(self.influential)})" if self.influential else ""
        return (
            f"Cook's distance: {len(self.influential)} of {len(self.personas)} above "
            f"4/N = {self.threshold:.3f}{named}; without {self.most_influential!r}: "
            f"r = {w.pearson_r:+.3f} (p = {w.pearson_p:.3g}), "
            f"rho = {w.spearman_rho:+.3f} (p = {w.spearman_p:.3g})."
        )


def influence(
    res: Any, x: np.ndarray, y: np.ndarray, names: list[str], fit_names: list[str]
) -> Influence:
    """Returns the ``Influence`` of the fitted personas (statsmodels ``OLSInfluence``)."""
    from statsmodels.stats.outliers_influence import OLSInfluence

    infl = OLSInfluence(res)
    cooks = np.asarray(infl.cooks_distance[0], dtype=np.float64)
    threshold = 4.0 / len(fit_names)
    order = np.argsort(-cooks, kind="stable")
    influential = tuple(fit_names[i] for i in order if cooks[i] > threshold)
    most = fit_names[int(order[0])]
    # Compared with the headline, so recomputed over all analysed personas minus that one.
    idx = [i for i, p in enumerate(names) if p != most]
    with np.errstate(invalid="ignore", divide="ignore"):
        student = np.asarray(infl.resid_studentized_external, dtype=np.float64)
    return Influence(
        personas=tuple(fit_names),
        cooks_distance=cooks,
        leverage=np.asarray(infl.hat_matrix_diag, dtype=np.float64),
        studentized_residuals=student,
        threshold=threshold,
        influential=influential,
        most_influential=most,
        without_most_influential=correlation(x[idx], y[idx]),
    )
