"""Robustness statistics at one layer: does the cosine–rate relation survive the usual doubts?

``robustness_at_layer`` works on per-persona vectors; ``analyze`` does the same from a table
(a DataFrame or a CSV path), which is what the ``persona-geometry analyze`` command calls.
Everything in the result is computed with statsmodels/scipy primitives, one concept per module:

- ``fits``: OLS of rate on cosine; for held-out personas, predictions and prediction intervals
  from a fit that excludes them, and whether each observed rate lies inside; leave-one-out
  prediction-interval coverage of the held-out personas;
- ``influence``: Cook's distance, the 4/N threshold and the correlation without the most
  influential persona;
- ``partial``: partial Spearman controlling for a covariate (log prompt length by default) and
  its VIF;
- ``categories``: within-category correlations;
- ``tables``: reading tables, pooling counts across seeds; Wilson intervals from raw counts come
  from the shared statistics (``persona_geometry.stats``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from persona_geometry._validation import check_probability, check_unique_names, invalid, renamed
from persona_geometry.analysis.categories import CategoryFit, category_labels, within_category
from persona_geometry.analysis.fits import (
    Correlation,
    HoldoutPrediction,
    LinearFit,
    LooCoverage,
    correlation,
    holdout_predictions,
    linear_fit,
    loo_coverage,
    ols,
    prediction_intervals,
)
from persona_geometry.analysis.influence import Influence, influence
from persona_geometry.analysis.partial import PartialSpearman, partial_spearman, vif
from persona_geometry.analysis.tables import PooledCounts, pool_seeds, read_table, require_columns
from persona_geometry.geometry import CosineToReference
from persona_geometry.stats import (
    PerPersona,
    check_rates,
    json_float,
    per_persona,
    rates_from,
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
    "ols",
    "partial_spearman",
    "pool_seeds",
    "prediction_intervals",
    "read_table",
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
        """Returns one row per persona.

        Columns: x, rate, counts, Wilson CI, category, role, Cook's distance, prediction.
        """
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
                    "predicted": h.predicted
                    if h
                    else self.fit.intercept + self.fit.slope * self.x[i],
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
            without_ref = {
                **self.without_reference.to_dict(),
                "fit": self.fit_without_reference.to_dict(),
            }
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
            "partial_spearman": None
            if self.partial_spearman is None
            else self.partial_spearman.to_dict(),
            "within_category": {c.category: c.to_dict() for c in self.within_category},
            "wilson": {p: [json_float(lo), json_float(hi)] for p, (lo, hi) in self.wilson.items()},
            "rates": {p: json_float(r) for p, r in zip(self.personas, self.rate, strict=True)},
            "x": {p: json_float(v) for p, v in zip(self.personas, self.x, strict=True)},
            "k": None
            if self.k is None
            else {p: int(v) for p, v in zip(self.personas, self.k, strict=True)},
            "n": None
            if self.n is None
            else {p: int(v) for p, v in zip(self.personas, self.n, strict=True)},
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
            f"{self.n_personas} personas{where}: "
            f"Pearson r = {c.pearson_r:+.3f} (p = {c.pearson_p:.3g}), "
            f"Spearman rho = {c.spearman_rho:+.3f} (p = {c.spearman_p:.3g}).",
            f"OLS on {self.fit.n} personas: rate = {self.fit.intercept:.3f} "
            f"{self.fit.slope:+.3f} * {self.x_name}, R^2 = {self.fit.r2:.3f}.",
        ]
        for h in self.holdout:
            lines.append(
                f"Held out {h.persona!r}: observed {h.observed:.3f}, predicted {h.predicted:.3f} "
                f"[{h.pi_lower:.3f}, {h.pi_upper:.3f}] -> {'inside' if h.inside else 'OUTSIDE'}."
            )
        if self.loo_coverage.total:
            lines.append(
                f"Leave-one-out PI coverage: {self.loo_coverage.covered}/{self.loo_coverage.total}."
            )
        lines.append(self.influence.summary())
        if self.partial_spearman is not None:
            ps = self.partial_spearman
            lines.append(
                f"Partial Spearman controlling for {ps.covariate}: "
                f"rho = {ps.rho:+.3f} (p = {ps.p:.3g}), VIF = {ps.vif:.2f}."
            )
        for cat in self.within_category:
            if cat.correlation is None:
                lines.append(
                    f"Category {cat.category!r} (n = {len(cat.personas)}): skipped, {cat.skipped}."
                )
            else:
                cc = cat.correlation
                lines.append(
                    f"Category {cat.category!r} (n = {cc.n}): "
                    f"r = {cc.pearson_r:+.3f}, rho = {cc.spearman_rho:+.3f}."
                )
        if self.without_reference is not None:
            w = self.without_reference
            lines.append(
                f"Without the reference {self.reference!r} (n = {w.n}): "
                f"r = {w.pearson_r:+.3f} (p = {w.pearson_p:.3g}), "
                f"rho = {w.spearman_rho:+.3f} (p = {w.spearman_p:.3g})."
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _PersonaData:
    """The validated per-persona inputs, aligned by name."""

    names: list[str]
    x: np.ndarray
    rate: np.ndarray
    k: np.ndarray | None
    n: np.ndarray | None
    cats: list[str]
    cov: np.ndarray | None

    def subset(self, keep: list[int]) -> _PersonaData:
        return _PersonaData(
            names=[self.names[i] for i in keep],
            x=self.x[keep],
            rate=self.rate[keep],
            k=None if self.k is None else self.k[keep],
            n=None if self.n is None else self.n[keep],
            cats=[self.cats[i] for i in keep],
            cov=None if self.cov is None else self.cov[keep],
        )


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
    x, personas, categories, reference = _unpack_cosines(
        x, personas, categories, reference, layer, func
    )
    data = _validate_inputs(x, y, k, n, personas, categories, covariate, func)
    holdout = _check_holdout_and_reference(holdout, reference, data.names, func)
    excluded: tuple[str, ...] = ()
    if exclude_reference:
        data, excluded = _exclude_reference(data, reference, holdout, func)
    fit_idx, hold_idx = _split_fit_holdout(data, holdout, func)

    fit, res = linear_fit(data.x[fit_idx], data.rate[fit_idx], [data.names[i] for i in fit_idx])
    without_ref, fit_without_ref = (
        (None, None) if exclude_reference else _without_reference(data, reference, fit_idx)
    )
    return Robustness(
        personas=tuple(data.names),
        categories=tuple(data.cats),
        x=data.x,
        rate=data.rate,
        k=data.k,
        n=data.n,
        x_name=x_name,
        layer=layer,
        alpha=alpha,
        correlation=correlation(data.x, data.rate),
        fit=fit,
        holdout=holdout_predictions(res, data.x, data.rate, data.names, hold_idx, alpha),
        loo_coverage=loo_coverage(data.x, data.rate, data.names, fit_idx, hold_idx, alpha),
        influence=influence(res, data.x, data.rate, data.names, [data.names[i] for i in fit_idx]),
        partial_spearman=_partial(data, covariate_name),
        within_category=within_category(data.x, data.rate, data.names, data.cats),
        wilson=_wilson(data, alpha),
        reference=reference,
        without_reference=without_ref,
        fit_without_reference=fit_without_ref,
        excluded=excluded,
    )


def _unpack_cosines(
    x: Any, personas: Any, categories: Any, reference: str | None, layer: int | None, func: str
) -> tuple[Any, Any, Any, str | None]:
    """Returns ``(x, personas, categories, reference)``, read off a CosineToReference."""
    if not isinstance(x, CosineToReference):
        return x, personas, categories, reference
    if layer is None:
        invalid(
            "layer", func, f"one of the layers {list(x.layers)} when x is a CosineToReference", None
        )
    values = x.at(layer)
    personas = list(values) if personas is None else list(personas)
    if categories is None:
        categories = dict(zip(x.personas, x.categories, strict=True))
    return values, personas, categories, x.reference if reference is None else reference


def _validate_inputs(
    x: Any, y: Any, k: Any, n: Any, personas: Any, categories: Any, covariate: Any, func: str
) -> _PersonaData:
    """Returns the per-persona inputs checked and aligned to the persona names."""
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
    cats = category_labels(categories, names, func)
    cov = per_persona(covariate, names, "covariate", func, allow_none=True)
    return _PersonaData(names=names, x=x_arr, rate=rate, k=k_arr, n=n_arr, cats=cats, cov=cov)


def _check_holdout_and_reference(
    holdout: Sequence[str] | None, reference: str | None, names: list[str], func: str
) -> list[str]:
    """Returns the held-out names after checking them and the reference against the table."""
    holdout = list(holdout or [])
    for h in holdout:
        if h not in names:
            invalid("holdout", func, f"persona names in the table {names}", h)
    if holdout:
        check_unique_names(holdout, "holdout", func)
    if reference is not None and reference not in names:
        invalid("reference", func, f"a persona name in the table {names}", reference)
    return holdout


def _exclude_reference(
    data: _PersonaData, reference: str | None, holdout: list[str], func: str
) -> tuple[_PersonaData, tuple[str, ...]]:
    """Returns the inputs without the reference persona, and the excluded names."""
    if reference is None:
        invalid("reference", func, "a persona name when exclude_reference=True", None)
    if reference in holdout:
        invalid("holdout", func, "personas other than the excluded reference", reference)
    return data.subset([i for i, p in enumerate(data.names) if p != reference]), (reference,)


def _split_fit_holdout(
    data: _PersonaData, holdout: list[str], func: str
) -> tuple[list[int], list[int]]:
    """Returns the positions of the fitted and of the held-out personas, checked to vary."""
    names, x_arr, rate = data.names, data.x, data.rate
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
    if np.ptp(x_arr[fit_idx]) == 0:
        invalid(
            "x",
            func,
            "values that vary across the fitted (non-held-out) personas",
            f"every value = {x_arr[fit_idx][0]!r}",
        )
    return fit_idx, hold_idx


def _partial(data: _PersonaData, covariate_name: str) -> PartialSpearman | None:
    """Returns the partial Spearman given the covariate (None without one)."""
    if data.cov is None:
        return None
    rho, p = partial_spearman(data.x, data.rate, data.cov)
    return PartialSpearman(
        rho=rho, p=p, vif=vif(data.x, data.cov), n=len(data.names), covariate=covariate_name
    )


def _wilson(data: _PersonaData, alpha: float) -> dict[str, tuple[float, float]]:
    """Returns each persona's Wilson interval of ``k / n`` ({} when only rates were given)."""
    if data.k is None or data.n is None:
        return {}
    lo, hi = wilson_interval(data.k, data.n, alpha=alpha)
    return {p: (float(lo[i]), float(hi[i])) for i, p in enumerate(data.names)}


def _without_reference(
    data: _PersonaData, reference: str | None, fit_idx: list[int]
) -> tuple[Correlation | None, LinearFit | None]:
    """Returns the correlation and the fit without the reference, where enough personas vary."""
    if reference is None:
        return None, None
    idx = [i for i, p in enumerate(data.names) if p != reference]
    if len(idx) < 3 or np.ptp(data.x[idx]) == 0 or np.ptp(data.rate[idx]) == 0:
        return None, None
    without = correlation(data.x[idx], data.rate[idx])
    fidx = [i for i in idx if i in fit_idx]
    if len(fidx) < 3 or np.ptp(data.x[fidx]) == 0:
        return without, None
    return without, linear_fit(data.x[fidx], data.rate[fidx], [data.names[i] for i in fidx])[0]


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
    seed_column: str | None = None,
    layer: int | None = None,
    alpha: float = 0.05,
    seed: str | None = None,
) -> Robustness:
    """Returns the robustness statistics computed from a per-persona table (DataFrame or CSV).

    Args:
        table: One row per persona (or per persona and seed, with ``seed_column``).
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
        seed_column: Column of seeds: rows of the same persona are pooled (counts add) first.
        layer: The layer ``x`` comes from, for the report.
        alpha: 1 - level of the prediction and Wilson intervals.
        seed: Deprecated name of ``seed_column`` (``seed`` means an RNG seed elsewhere).

    Raises:
        ValueError: On a missing column, duplicate personas, and everything
            ``robustness_at_layer`` rejects.
    """
    func = "analyze"
    seed_column = renamed(seed_column, seed, new="seed_column", old="seed", func=func)
    frame = read_table(table, func)
    if (k is None) != (n is None) or (rate is None) == (k is None):
        invalid(
            "k",
            func,
            "given with n (raw counts), or rate given instead",
            {"k": k, "n": n, "rate": rate},
        )
    require_columns(
        frame,
        {
            "persona": persona,
            "x": x,
            "k": k,
            "n": n,
            "rate": rate,
            "category": category,
            "covariate": covariate,
            "seed_column": seed_column,
        },
        func,
    )
    if len(frame) == 0:
        invalid("table", func, "a table with at least 3 rows", "an empty table")
    for col in [c for c in (x, k, n, rate, covariate) if c is not None]:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = (
            frame.loc[values.isna() | ~np.isfinite(values.fillna(0)), persona].astype(str).tolist()
        )
        if bad:
            invalid(
                col, func, "finite numbers in every row", f"missing or non-numeric values for {bad}"
            )
    if rate is not None:
        rates = pd.to_numeric(frame[rate]).to_numpy(dtype=np.float64)
        check_rates(rates, frame[persona].tolist(), rate, func)
    frame = frame.assign(**{persona: frame[persona].astype(str)})

    if seed_column is not None:
        if k is None:
            invalid(
                "seed_column",
                func,
                "used with raw counts k and n (pooling adds counts)",
                seed_column,
            )
        pooled = pool_seeds(frame, persona=persona, seed_column=seed_column, k=k, n=n)
        first = frame.drop_duplicates(persona).set_index(persona).loc[list(pooled.personas)]
        for col in [c for c in (x, category, covariate) if c is not None]:
            varying = frame.groupby(persona, sort=False)[col].nunique()
            if (varying > 1).any():
                invalid(
                    col,
                    func,
                    "one value per persona across seeds",
                    f"several values for {varying[varying > 1].index.tolist()}",
                )
        names = list(pooled.personas)
        k_values, n_values, rate_values = pooled.k, pooled.n, None
    else:
        dup = frame[persona].duplicated()
        if dup.any():
            invalid(
                "table",
                func,
                f"one row per persona in column {persona!r} (or pass seed_column= to pool seeds)",
                f"{frame.loc[dup, persona].tolist()} more than once",
            )
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
            invalid(
                "n_tokens",
                func,
                "positive token counts (their log is the default covariate)",
                tokens.tolist(),
            )
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
