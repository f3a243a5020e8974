"""Robustness statistics at one layer: does the cosine–rate relation survive the usual doubts?

``robustness_at_layer`` works on per-persona vectors; ``analyze`` does the same from a table
(a DataFrame or a CSV path), which is what the ``persona-geometry analyze`` command calls.
Everything in the result is computed with statsmodels/scipy primitives:

- OLS of rate on cosine; for held-out personas, predictions and prediction intervals from a fit
  that excludes them, and whether each observed rate lies inside;
- leave-one-out prediction-interval coverage of the held-out personas;
- Cook's distance (``Influence``), the 4/N threshold and the correlation without the most
  influential persona;
- partial Spearman controlling for a covariate (log prompt length by default) and its VIF;
- within-category correlations; Wilson intervals from raw counts; pooling across seeds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from persona_geometry._validation import check_probability, check_unique_names, invalid
from persona_geometry.geometry import CosineToReference
from persona_geometry.stats import (
    PerPersona,
    check_rates,
    clip_r,
    correlation_dict,
    json_float,
    p_from_r,
    pearson,
    per_persona,
    rank,
    rates_from,
    spearman,
    standardize,
    wilson_interval,
)

__all__ = [
    "SCHEMA",
    "CategoryFit",
    "Correlation",
    "HoldoutPrediction",
    "Influence",
    "LinearFit",
    "LooCoverage",
    "PartialSpearman",
    "PooledCounts",
    "Robustness",
    "analyze",
    "partial_spearman",
    "pool_seeds",
    "robustness_at_layer",
    "wilson_interval",
]

SCHEMA = """\
JSON schema of ``persona-geometry analyze`` (``Robustness.to_dict()``), schema_version 1.
Rates are fractions in [0, 1]; NaN is written as null. Keys:

  schema_version            1
  x_name, layer             the x column's name and layer (layer may be null)
  n_personas                personas analysed (after exclusions)
  personas                  their names, in table order
  pearson {r, p}            headline Pearson of rate on x over all analysed personas
  spearman {rho, p}         headline Spearman over all analysed personas
  fit {slope, intercept, r2, n, slope_p}
                            OLS rate ~ x on the fitted personas (all minus --holdout)
  holdout [{persona, x, observed, predicted, pi_lower, pi_upper, inside}]
                            95% prediction intervals from the fit without the held-out personas
  loo_pi_coverage {covered, total}
                            drop each fitted persona in turn, refit, count held-out personas
                            still inside their new interval (total = fitted x held-out)
  cooks_distance {persona: value}
                            Cook's distance of each fitted persona
  cooks_threshold           4 / N (N = fitted personas)
  influential [persona]     personas with Cook's distance above the threshold, largest first
  without_most_influential {persona, n, pearson {r, p}, spearman {rho, p}}
                            headline correlations without the persona of largest Cook's distance
  partial_spearman {rho, p, vif, n, covariate}
                            rank partial correlation controlling for the covariate; null if none
  within_category {category: {n, pearson {r, p}, spearman {rho, p}}}
                            or {category: {n, skipped: reason}} (fewer than 3 personas, constant)
  wilson {persona: [lower, upper]}
                            Wilson 95% intervals of k/n ({} when only rates were given)
  rates {persona: rate}, x {persona: value}, k {persona: k}, n {persona: n} (k/n null if absent)
  categories {persona: category}
  reference                 the reference persona or null
  excluded [persona]        personas dropped before anything was computed (the reference with
                            --exclude-reference)
  without_reference {n, pearson {r, p}, spearman {rho, p}, fit {slope, intercept, r2, n, slope_p}}
                            when the reference was among the analysed personas; else null
  alpha                     1 - level of the prediction and Wilson intervals (0.05)

When holdout personas are given, the headline pearson/spearman use all personas and fit/holdout
use the fit without them.
"""


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
        """Returns one row per fitted persona: cooks_distance, leverage, studentized_residual, above_threshold."""
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
        """Returns the schema's cooks_distance, cooks_threshold, influential, without_most_influential."""
        return {
            "cooks_distance": {p: json_float(d) for p, d in zip(self.personas, self.cooks_distance, strict=True)},
            "cooks_threshold": json_float(self.threshold),
            "influential": list(self.influential),
            "without_most_influential": {"persona": self.most_influential, **self.without_most_influential.to_dict()},
        }

    def summary(self) -> str:
        """Returns one line on influence."""
        w = self.without_most_influential
        return (
            f"Cook's distance: {len(self.influential)} of {len(self.personas)} above 4/N = {self.threshold:.3f}"
            f"{' (' + ', '.join(self.influential) + ')' if self.influential else ''}; without {self.most_influential!r}: "
            f"r = {w.pearson_r:+.3f} (p = {w.pearson_p:.3g}), rho = {w.spearman_rho:+.3f} (p = {w.spearman_p:.3g})."
        )


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
        return {"rho": json_float(self.rho), "p": json_float(self.p), "vif": json_float(self.vif), "n": self.n, "covariate": self.covariate}


@dataclass(frozen=True, kw_only=True)
class CategoryFit:
    """Correlation within one category, or why it was skipped."""

    category: str
    personas: tuple[str, ...]
    correlation: Correlation | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns ``{n, pearson, spearman}`` or ``{n, skipped}``."""
        if self.correlation is None:
            return {"n": len(self.personas), "skipped": self.skipped}
        return self.correlation.to_dict()


@dataclass(frozen=True, kw_only=True, eq=False)
class PooledCounts:
    """Marker counts summed over seeds, with the per-seed rates kept.

    Attributes:
        personas: Persona names, in first-seen order.
        k, n: Counts summed over seeds.
        per_seed: persona × seed table of per-seed rates (NaN where a seed lacks a persona).
        per_seed_k, per_seed_n: The same tables of counts.
    """

    personas: tuple[str, ...]
    k: Float[np.ndarray, " persona"]
    n: Float[np.ndarray, " persona"]
    per_seed: pd.DataFrame = field(repr=False)
    per_seed_k: pd.DataFrame = field(repr=False)
    per_seed_n: pd.DataFrame = field(repr=False)

    @property
    def rate(self) -> np.ndarray:
        """Pooled rate ``sum(k) / sum(n)`` per persona."""
        return self.k / self.n

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per persona: k, n, rate and ``rate_seed_<s>`` per seed."""
        frame = pd.DataFrame({"persona": list(self.personas), "k": self.k, "n": self.n, "rate": self.rate})
        for s in self.per_seed.columns:
            frame[f"rate_seed_{s}"] = self.per_seed[s].to_numpy()
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Returns ``{persona: {k, n, rate, per_seed {seed: rate}}}``."""
        return {
            p: {
                "k": int(self.k[i]),
                "n": int(self.n[i]),
                "rate": float(self.rate[i]),
                "per_seed": {str(s): json_float(self.per_seed.loc[p, s]) for s in self.per_seed.columns},
            }
            for i, p in enumerate(self.personas)
        }

    def summary(self) -> str:
        """Returns one line: how many personas and seeds were pooled."""
        return f"Pooled {len(self.personas)} personas over {self.per_seed.shape[1]} seeds (counts add; per-seed rates kept)."


@dataclass(frozen=True, kw_only=True, eq=False)
class Robustness:
    """Every robustness statistic of the cosine–rate relation at one layer.

    ``to_dict()`` follows the stable JSON schema ``SCHEMA`` (quoted in the README).
    """

    personas: tuple[str, ...]
    categories: tuple[str, ...]
    x: Float[np.ndarray, " persona"]
    rate: Float[np.ndarray, " persona"]
    k: Float[np.ndarray, " persona"] | None
    n: Float[np.ndarray, " persona"] | None
    x_name: str
    layer: int | None
    alpha: float
    correlation: Correlation
    fit: LinearFit
    holdout: tuple[HoldoutPrediction, ...]
    loo_coverage: LooCoverage
    influence: Influence
    partial_spearman: PartialSpearman | None
    within_category: tuple[CategoryFit, ...]
    wilson: dict[str, tuple[float, float]]
    reference: str | None = None
    without_reference: Correlation | None = None
    fit_without_reference: LinearFit | None = None
    excluded: tuple[str, ...] = ()

    @property
    def n_personas(self) -> int:
        """The number of personas analysed."""
        return len(self.personas)

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per persona: x, rate, counts, Wilson CI, category, role, Cook's distance, prediction."""
        held = {h.persona: h for h in self.holdout}
        cooks = dict(zip(self.influence.personas, self.influence.cooks_distance, strict=True))
        rows = []
        for i, p in enumerate(self.personas):
            h = held.get(p)
            lo, hi = self.wilson.get(p, (math.nan, math.nan))
            rows.append(
                {
                    "persona": p,
                    "category": self.categories[i],
                    self.x_name: self.x[i],
                    "rate": self.rate[i],
                    "k": math.nan if self.k is None else self.k[i],
                    "n": math.nan if self.n is None else self.n[i],
                    "wilson_lower": lo,
                    "wilson_upper": hi,
                    "role": "holdout" if h else ("reference" if p == self.reference else "fitted"),
                    "cooks_distance": cooks.get(p, math.nan),
                    "predicted": h.predicted if h else self.fit.intercept + self.fit.slope * self.x[i],
                    "pi_lower": h.pi_lower if h else math.nan,
                    "pi_upper": h.pi_upper if h else math.nan,
                    "inside": h.inside if h else None,
                }
            )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """Returns the result in the stable JSON schema ``SCHEMA`` (schema_version 1)."""
        corr = self.correlation.to_dict()
        without_ref = None
        if self.without_reference is not None and self.fit_without_reference is not None:
            without_ref = {**self.without_reference.to_dict(), "fit": self.fit_without_reference.to_dict()}
        return {
            "schema_version": 1,
            "x_name": self.x_name,
            "layer": self.layer,
            "n_personas": self.n_personas,
            "personas": list(self.personas),
            "pearson": corr["pearson"],
            "spearman": corr["spearman"],
            "fit": self.fit.to_dict(),
            "holdout": [h.to_dict() for h in self.holdout],
            "loo_pi_coverage": self.loo_coverage.to_dict(),
            **self.influence.to_dict(),
            "partial_spearman": None if self.partial_spearman is None else self.partial_spearman.to_dict(),
            "within_category": {c.category: c.to_dict() for c in self.within_category},
            "wilson": {p: [json_float(lo), json_float(hi)] for p, (lo, hi) in self.wilson.items()},
            "rates": {p: json_float(r) for p, r in zip(self.personas, self.rate, strict=True)},
            "x": {p: json_float(v) for p, v in zip(self.personas, self.x, strict=True)},
            "k": None if self.k is None else {p: int(v) for p, v in zip(self.personas, self.k, strict=True)},
            "n": None if self.n is None else {p: int(v) for p, v in zip(self.personas, self.n, strict=True)},
            "categories": dict(zip(self.personas, self.categories, strict=True)),
            "reference": self.reference,
            "without_reference": without_ref,
            "excluded": list(self.excluded),
            "alpha": self.alpha,
        }

    def summary(self) -> str:
        """Returns a short plain-text account of every robustness check."""
        c = self.correlation
        where = f" at layer {self.layer}" if self.layer is not None else ""
        lines = [
            f"{self.n_personas} personas{where}: Pearson r = {c.pearson_r:+.3f} (p = {c.pearson_p:.3g}), "
            f"Spearman rho = {c.spearman_rho:+.3f} (p = {c.spearman_p:.3g}).",
            f"OLS on {self.fit.n} personas: rate = {self.fit.intercept:.3f} {self.fit.slope:+.3f} * {self.x_name}, R^2 = {self.fit.r2:.3f}.",
        ]
        for h in self.holdout:
            lines.append(
                f"Held out {h.persona!r}: observed {h.observed:.3f}, predicted {h.predicted:.3f} "
                f"[{h.pi_lower:.3f}, {h.pi_upper:.3f}] -> {'inside' if h.inside else 'OUTSIDE'}."
            )
        if self.loo_coverage.total:
            lines.append(f"Leave-one-out PI coverage: {self.loo_coverage.covered}/{self.loo_coverage.total}.")
        lines.append(self.influence.summary())
        if self.partial_spearman is not None:
            ps = self.partial_spearman
            lines.append(f"Partial Spearman controlling for {ps.covariate}: rho = {ps.rho:+.3f} (p = {ps.p:.3g}), VIF = {ps.vif:.2f}.")
        for cat in self.within_category:
            if cat.correlation is None:
                lines.append(f"Category {cat.category!r} (n = {len(cat.personas)}): skipped, {cat.skipped}.")
            else:
                cc = cat.correlation
                lines.append(f"Category {cat.category!r} (n = {cc.n}): r = {cc.pearson_r:+.3f}, rho = {cc.spearman_rho:+.3f}.")
        if self.without_reference is not None:
            w = self.without_reference
            lines.append(
                f"Without the reference {self.reference!r} (n = {w.n}): r = {w.pearson_r:+.3f} (p = {w.pearson_p:.3g}), "
                f"rho = {w.spearman_rho:+.3f} (p = {w.spearman_p:.3g})."
            )
        return "\n".join(lines)


# --- primitives -------------------------------------------------------------------------------
def partial_spearman(x: np.ndarray, y: np.ndarray, covariate: np.ndarray) -> tuple[float, float]:
    """Returns the rank partial correlation of ``x`` and ``y`` given ``covariate``, and its p-value.

    The three variables are ranked; ranks of ``x`` and ``y`` are regressed on the covariate's
    ranks (with an intercept) and the residuals correlated. The p-value is the t-test with
    ``n - 3`` degrees of freedom (one covariate), as in the usual partial-correlation test.
    """
    rx, ry, rz = rank(np.asarray(x, float)), rank(np.asarray(y, float)), rank(np.asarray(covariate, float))
    design = np.column_stack([np.ones_like(rz), rz])
    res_x = rx - design @ np.linalg.lstsq(design, rx, rcond=None)[0]
    res_y = ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]
    sx, sy = standardize(res_x), standardize(res_y)
    if np.isnan(sx).any() or np.isnan(sy).any():
        return math.nan, math.nan
    rho = float(clip_r(sx @ sy))
    return rho, float(p_from_r(rho, len(x) - 3))


def _correlation(x: np.ndarray, y: np.ndarray) -> Correlation:
    if len(x) < 3:  # two points always sit on a line: no correlation to report
        return Correlation(n=len(x), pearson_r=math.nan, pearson_p=math.nan, spearman_rho=math.nan, spearman_p=math.nan)
    r, pr = pearson(x, y)
    rho, prho = spearman(x, y)
    return Correlation(n=len(x), pearson_r=r, pearson_p=pr, spearman_rho=rho, spearman_p=prho)


def ols(x: np.ndarray, y: np.ndarray) -> Any:
    import statsmodels.api as sm

    return sm.OLS(y, np.column_stack([np.ones_like(x), x])).fit()


def _linear_fit(x: np.ndarray, y: np.ndarray, personas: Sequence[str]) -> tuple[LinearFit, Any]:
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


# --- the analysis -----------------------------------------------------------------------------
def robustness_at_layer(
    x: CosineToReference | PerPersona,
    y: PerPersona = None,
    *,
    k: PerPersona = None,
    n: PerPersona = None,
    personas: Sequence[str] | None = None,
    categories: Sequence[str] | Mapping[str, str] | None = None,
    covariate: PerPersona = None,
    covariate_name: str = "log_n_tokens",
    holdout: Sequence[str] | None = None,
    reference: str | None = None,
    exclude_reference: bool = False,
    layer: int | None = None,
    x_name: str = "cosine",
    alpha: float = 0.05,
) -> Robustness:
    """Returns every robustness statistic of rate vs ``x`` across personas at one layer.

    Args:
        x: Per-persona cosine at one layer (sequence in ``personas`` order, or a mapping), or a
            ``CosineToReference`` together with ``layer``.
        y: Rates (fractions in [0, 1]); or leave None and give raw counts ``k`` and ``n``.
        k: Marker counts per persona.
        n: Completions per persona.
        personas: Persona names (taken from ``x`` when it is a CosineToReference or a mapping).
        categories: Category per persona (sequence or mapping); None puts all in one.
        covariate: Per-persona covariate for the partial Spearman, e.g. the log token length of
            the persona's prompt; None skips it.
        covariate_name: Name of the covariate in the report.
        holdout: Personas left out of the fit and predicted from it.
        reference: The reference persona (cosine 1 by construction). When present it is
            analysed, and fits without it are reported too; see ``exclude_reference``.
        exclude_reference: Drop the reference persona from everything.
        layer: The layer the cosines come from (required with a CosineToReference).
        x_name: Name of x in reports.
        alpha: 1 - level of prediction and Wilson intervals.

    Returns:
        A ``Robustness`` result.

    Raises:
        ValueError: On fewer than 3 personas (or fewer than 3 left to fit), duplicate names,
            NaN, ``k > n`` or negative counts, constant x or rate, or a held-out/reference
            persona that is not in the table.
    """
    func = "robustness_at_layer"
    alpha = check_probability(alpha, "alpha", func)
    if isinstance(x, CosineToReference):
        if layer is None:
            invalid("layer", func, f"one of the layers {list(x.layers)} when x is a CosineToReference", None)
        values = x.at(layer)
        personas = list(values) if personas is None else list(personas)
        if categories is None:
            categories = dict(zip(x.personas, x.categories, strict=True))
        reference = x.reference if reference is None else reference
        x = values
    if personas is None:
        if isinstance(x, Mapping):
            personas = list(x)
        elif isinstance(getattr(x, "index", None), pd.Index):
            personas = [str(p) for p in x.index]
        else:
            invalid("personas", func, "the persona names (one per value of x)", None, exc=TypeError)
    names = check_unique_names([str(p) for p in personas], "personas", func)
    x_arr = per_persona(x, names, "x", func)
    rate, k_arr, n_arr = rates_from(y, k, n, names, func)
    cats = _categories(categories, names, func)
    cov = per_persona(covariate, names, "covariate", func, allow_none=True)

    holdout = list(holdout or [])
    for h in holdout:
        if h not in names:
            invalid("holdout", func, f"persona names in the table {names}", h)
    if holdout:
        check_unique_names(holdout, "holdout", func)
    if reference is not None and reference not in names:
        invalid("reference", func, f"a persona name in the table {names}", reference)
    excluded: tuple[str, ...] = ()
    if exclude_reference:
        if reference is None:
            invalid("reference", func, "a persona name when exclude_reference=True", None)
        if reference in holdout:
            invalid("holdout", func, "personas other than the excluded reference", reference)
        keep = [i for i, p in enumerate(names) if p != reference]
        excluded = (reference,)
        names = [names[i] for i in keep]
        x_arr, rate, cats = x_arr[keep], rate[keep], [cats[i] for i in keep]
        k_arr = None if k_arr is None else k_arr[keep]
        n_arr = None if n_arr is None else n_arr[keep]
        cov = None if cov is None else cov[keep]

    if len(names) < 3:
        invalid("personas", func, "at least 3 personas", f"{len(names)}: {names}")
    if np.ptp(x_arr) == 0:
        invalid("x", func, "values that vary across personas", f"every value = {x_arr[0]!r}")
    if np.ptp(rate) == 0:
        invalid("y", func, "rates that vary across personas", f"every rate = {rate[0]!r}")

    fit_idx = [i for i, p in enumerate(names) if p not in holdout]
    hold_idx = [i for i, p in enumerate(names) if p in holdout]
    if len(fit_idx) < 3:
        invalid("holdout", func, "few enough personas to leave at least 3 to fit", holdout)
    fit_names = [names[i] for i in fit_idx]
    if np.ptp(x_arr[fit_idx]) == 0:
        invalid("x", func, "values that vary across the fitted (non-held-out) personas", f"every value = {x_arr[fit_idx][0]!r}")

    correlation = _correlation(x_arr, rate)
    fit, res = _linear_fit(x_arr[fit_idx], rate[fit_idx], fit_names)

    held: list[HoldoutPrediction] = []
    if hold_idx:
        frame = prediction_intervals(res, x_arr[hold_idx], alpha)
        for row, i in enumerate(hold_idx):
            held.append(
                HoldoutPrediction(
                    persona=names[i],
                    x=float(x_arr[i]),
                    observed=float(rate[i]),
                    predicted=float(frame["mean"].iloc[row]),
                    pi_lower=float(frame["obs_ci_lower"].iloc[row]),
                    pi_upper=float(frame["obs_ci_upper"].iloc[row]),
                )
            )
    loo = _loo_coverage(x_arr, rate, names, fit_idx, hold_idx, alpha)
    influence = _influence(res, x_arr, rate, names, fit_names)

    partial = None
    if cov is not None:
        rho, p = partial_spearman(x_arr, rate, cov)
        partial = PartialSpearman(rho=rho, p=p, vif=_vif(x_arr, cov), n=len(names), covariate=covariate_name)

    wilson: dict[str, tuple[float, float]] = {}
    if k_arr is not None and n_arr is not None:
        lo, hi = wilson_interval(k_arr, n_arr, alpha=alpha)
        wilson = {p: (float(lo[i]), float(hi[i])) for i, p in enumerate(names)}

    without_ref = fit_without_ref = None
    if reference is not None and not exclude_reference:
        idx = [i for i, p in enumerate(names) if p != reference]
        if len(idx) >= 3 and np.ptp(x_arr[idx]) > 0 and np.ptp(rate[idx]) > 0:
            without_ref = _correlation(x_arr[idx], rate[idx])
            fidx = [i for i in idx if i in fit_idx]
            if len(fidx) >= 3 and np.ptp(x_arr[fidx]) > 0:
                fit_without_ref = _linear_fit(x_arr[fidx], rate[fidx], [names[i] for i in fidx])[0]

    return Robustness(
        personas=tuple(names),
        categories=tuple(cats),
        x=x_arr,
        rate=rate,
        k=k_arr,
        n=n_arr,
        x_name=x_name,
        layer=layer,
        alpha=alpha,
        correlation=correlation,
        fit=fit,
        holdout=tuple(held),
        loo_coverage=loo,
        influence=influence,
        partial_spearman=partial,
        within_category=_within_category(x_arr, rate, names, cats),
        wilson=wilson,
        reference=reference,
        without_reference=without_ref,
        fit_without_reference=fit_without_ref,
        excluded=excluded,
    )


def _categories(categories: Any, names: list[str], func: str) -> list[str]:
    if categories is None:
        return ["all"] * len(names)
    if isinstance(categories, Mapping):
        missing = [p for p in names if p not in categories]
        if missing:
            invalid("categories", func, "a category for every persona", f"none for {missing}")
        return [str(categories[p]) for p in names]
    cats = [str(c) for c in categories]
    if len(cats) != len(names):
        invalid("categories", func, f"{len(names)} categories (one per persona)", len(cats))
    return cats


def _loo_coverage(
    x: np.ndarray, y: np.ndarray, names: list[str], fit_idx: list[int], hold_idx: list[int], alpha: float
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
            inside = bool(frame["obs_ci_lower"].iloc[row] <= y[h] <= frame["obs_ci_upper"].iloc[row])
            cases.append((names[drop], names[h], inside))
    return LooCoverage(covered=sum(c[2] for c in cases), total=len(cases), cases=tuple(cases))


def _influence(res: Any, x: np.ndarray, y: np.ndarray, names: list[str], fit_names: list[str]) -> Influence:
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
        without_most_influential=_correlation(x[idx], y[idx]),
    )


def _vif(x: np.ndarray, covariate: np.ndarray) -> float:
    from statsmodels.stats.outliers_influence import variance_inflation_factor

    exog = np.column_stack([np.ones_like(x), x, covariate])
    with np.errstate(divide="ignore"):
        return float(variance_inflation_factor(exog, 1))


def _within_category(x: np.ndarray, y: np.ndarray, names: list[str], cats: list[str]) -> tuple[CategoryFit, ...]:
    out = []
    for cat in dict.fromkeys(cats):
        idx = [i for i, c in enumerate(cats) if c == cat]
        members = tuple(names[i] for i in idx)
        if len(idx) < 3:
            out.append(CategoryFit(category=cat, personas=members, skipped=f"fewer than 3 personas (n={len(idx)})"))
        elif np.ptp(x[idx]) == 0:
            out.append(CategoryFit(category=cat, personas=members, skipped="constant x within the category"))
        elif np.ptp(y[idx]) == 0:
            out.append(CategoryFit(category=cat, personas=members, skipped="constant rate within the category"))
        else:
            out.append(CategoryFit(category=cat, personas=members, correlation=_correlation(x[idx], y[idx])))
    return tuple(out)


# --- tables -----------------------------------------------------------------------------------
def pool_seeds(
    table: pd.DataFrame,
    *,
    persona: str = "persona",
    seed: str = "seed",
    k: str = "k",
    n: str = "n",
) -> PooledCounts:
    """Returns counts summed over seeds per persona, keeping every seed's rate.

    Args:
        table: One row per (persona, seed) with raw counts.
        persona, seed, k, n: Column names.

    Raises:
        ValueError: On a missing column, a (persona, seed) pair given twice, or bad counts.
    """
    func = "pool_seeds"
    _require_columns(table, {"persona": persona, "seed": seed, "k": k, "n": n}, func)
    dup = table.duplicated([persona, seed])
    if dup.any():
        row = table.loc[dup, [persona, seed]].iloc[0].tolist()
        invalid("table", func, "one row per (persona, seed)", f"(persona, seed) = {tuple(row)} twice")
    names = [str(p) for p in dict.fromkeys(table[persona])]
    from persona_geometry.stats import check_counts

    check_counts(
        table[k].to_numpy(dtype=np.float64),
        table[n].to_numpy(dtype=np.float64),
        [f"{p} (seed {s})" for p, s in zip(table[persona], table[seed], strict=True)],
        func,
    )
    frame = table.assign(**{persona: table[persona].astype(str)})
    per_k = frame.pivot(index=persona, columns=seed, values=k).reindex(names)
    per_n = frame.pivot(index=persona, columns=seed, values=n).reindex(names)
    return PooledCounts(
        personas=tuple(names),
        k=per_k.sum(axis=1).to_numpy(dtype=np.float64),
        n=per_n.sum(axis=1).to_numpy(dtype=np.float64),
        per_seed=per_k / per_n,
        per_seed_k=per_k,
        per_seed_n=per_n,
    )


def _require_columns(table: pd.DataFrame, columns: Mapping[str, str | None], func: str) -> None:
    for param, col in columns.items():
        if col is not None and col not in table.columns:
            invalid(param, func, f"a column of the table {list(map(str, table.columns))}", col)


def read_table(table: pd.DataFrame | str | os.PathLike[str], func: str) -> pd.DataFrame:
    """Returns ``table`` itself, or the CSV it names read into a DataFrame."""
    if isinstance(table, pd.DataFrame):
        return table
    if not isinstance(table, str | os.PathLike):
        invalid("table", func, "a DataFrame or a CSV path", type(table).__name__, exc=TypeError)
    if not os.path.exists(table):
        raise FileNotFoundError(f"The 'table' parameter of {func} must be an existing CSV file. Got {str(table)!r} instead.")
    try:
        return pd.read_csv(table)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"The 'table' parameter of {func} must be a readable CSV file. Got {str(table)!r} ({e}) instead.") from e


def analyze(
    table: pd.DataFrame | str | os.PathLike[str],
    *,
    x: str,
    k: str | None = None,
    n: str | None = None,
    rate: str | None = None,
    persona: str = "persona",
    category: str | None = None,
    covariate: str | None = None,
    holdout: Sequence[str] | None = None,
    reference: str | None = None,
    exclude_reference: bool = False,
    seed: str | None = None,
    layer: int | None = None,
    alpha: float = 0.05,
) -> Robustness:
    """Returns the robustness statistics computed from a per-persona table (DataFrame or CSV).

    Args:
        table: One row per persona (or per persona and seed, with ``seed``).
        x: Column of the geometry measure (cosine at one layer).
        k, n: Columns of raw counts (rate = k / n). Give these, or ``rate``.
        rate: Column of rates, when raw counts are not available (no Wilson intervals then).
        persona: Column of persona names.
        category: Column of categories, for within-category fits.
        covariate: Column of the partial-Spearman covariate. By default, ``log_n_tokens`` if the
            table has it, else ``log(n_tokens)`` if it has ``n_tokens``, else none.
        holdout: Personas to hold out of the fit.
        reference: Reference persona (fits with and without it are reported).
        exclude_reference: Drop the reference from everything.
        seed: Column of seeds: rows of the same persona are pooled (counts add) first.
        layer: The layer ``x`` comes from, for the report.
        alpha: 1 - level of the prediction and Wilson intervals.

    Raises:
        ValueError: On a missing column, duplicate personas, and everything
            ``robustness_at_layer`` rejects.
    """
    func = "analyze"
    frame = read_table(table, func)
    if (k is None) != (n is None) or (rate is None) == (k is None):
        invalid("k", func, "given with n (raw counts), or rate given instead", {"k": k, "n": n, "rate": rate})
    _require_columns(frame, {"persona": persona, "x": x, "k": k, "n": n, "rate": rate, "category": category, "covariate": covariate, "seed": seed}, func)
    if len(frame) == 0:
        invalid("table", func, "a table with at least 3 rows", "an empty table")
    for col in [c for c in (x, k, n, rate, covariate) if c is not None]:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = frame.loc[values.isna() | ~np.isfinite(values.fillna(0)), persona].astype(str).tolist()
        if bad:
            invalid(col, func, "finite numbers in every row", f"missing or non-numeric values for {bad}")
    if rate is not None:
        check_rates(pd.to_numeric(frame[rate]).to_numpy(dtype=np.float64), frame[persona].tolist(), rate, func)
    frame = frame.assign(**{persona: frame[persona].astype(str)})

    if seed is not None:
        if k is None:
            invalid("seed", func, "used with raw counts k and n (pooling adds counts)", seed)
        pooled = pool_seeds(frame, persona=persona, seed=seed, k=k, n=n)
        first = frame.drop_duplicates(persona).set_index(persona).loc[list(pooled.personas)]
        for col in [c for c in (x, category, covariate) if c is not None]:
            varying = frame.groupby(persona, sort=False)[col].nunique()
            if (varying > 1).any():
                invalid(col, func, "one value per persona across seeds", f"several values for {varying[varying > 1].index.tolist()}")
        names = list(pooled.personas)
        k_values, n_values, rate_values = pooled.k, pooled.n, None
    else:
        dup = frame[persona].duplicated()
        if dup.any():
            invalid("table", func, f"one row per persona in column {persona!r} (or pass seed= to pool seeds)", f"{frame.loc[dup, persona].tolist()} more than once")
        first = frame.set_index(persona)
        names = list(first.index)
        k_values = None if k is None else first[k].to_numpy(dtype=np.float64)
        n_values = None if n is None else first[n].to_numpy(dtype=np.float64)
        rate_values = None if rate is None else first[rate].to_numpy(dtype=np.float64)

    cov_values, cov_name = None, covariate or "log_n_tokens"
    if covariate is not None:
        cov_values = first[covariate].to_numpy(dtype=np.float64)
    elif "log_n_tokens" in first.columns:
        cov_values = pd.to_numeric(first["log_n_tokens"]).to_numpy(dtype=np.float64)
    elif "n_tokens" in first.columns:
        tokens = pd.to_numeric(first["n_tokens"]).to_numpy(dtype=np.float64)
        if (tokens <= 0).any():
            invalid("n_tokens", func, "positive token counts (their log is the default covariate)", tokens.tolist())
        cov_values = np.log(tokens)

    return robustness_at_layer(
        first[x].to_numpy(dtype=np.float64),
        rate_values,
        k=k_values,
        n=n_values,
        personas=names,
        categories=None if category is None else first[category].astype(str).tolist(),
        covariate=cov_values,
        covariate_name=cov_name,
        holdout=holdout,
        reference=reference,
        exclude_reference=exclude_reference,
        layer=layer,
        x_name=x,
        alpha=alpha,
    )
