"""Comparing finished studies across models, seeds and layers, at relative depth.

``compare_studies`` reads the output folders ``run_study`` wrote (``config.resolved.yaml``,
``sweep/sweep.json``, ``report/report.json``, the extraction manifest and every
``eval/<source>/seed<k>/run_result.json``) and puts them side by side:

- per study: model, number of blocks, primary layer and its statistic, strongest layer,
  max-over-layers permutation p;
- the sweep curves on relative depth ``layer / n_layers`` (one figure, bootstrap bands);
- a random-effects meta-analysis of the per-study correlations at one relative depth
  (Fisher z, ``statsmodels.stats.meta_analysis.combine_effects``) with τ² and I², and
  whether the sign agrees everywhere;
- for studies of one model that differ only in their seeds: per-persona counts pooled over
  seeds (``pool_seeds``) with Wilson intervals and the seed-to-seed spread, the seed-to-seed
  correlation of rates, and which conclusions hold in every seed.

Studies must share their personas and reference persona; with ``intersect=True`` each study's
sweep and robustness are recomputed on the shared personas from its cached activations and
counts, and the result says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from persona_geometry._validation import check_one_of, check_probability, invalid
from persona_geometry.settings import META_METHODS
from persona_geometry.stats import STATISTICS, json_float

__all__ = [
    "MetaAnalysis",
    "SeedGroup",
    "StudyComparison",
    "StudyRecord",
    "compare_studies",
    "comparison_markdown",
    "read_study",
    "write_comparison",
]

log = logging.getLogger(__name__)

# Settings that change neither what a study measures nor how: two studies that differ only in
# these (and in any key named seed or seeds) are seed replicates of one another.
_NOT_DESIGN = {
    ("name",),
    ("out",),
    ("model", "device"),
    ("extract", "batch_tokens"),
    ("eval", "batch_size"),
}
_SEED_KEYS = {"seed", "seeds"}
# A correlation of exactly ±1 has an infinite Fisher z; it enters the meta-analysis at this |r|.
_R_MAX = 1.0 - 1e-7


def _stat_key(statistic: str) -> tuple[str, str]:
    return ("spearman", "rho") if statistic == "spearman" else ("pearson", "r")


@dataclass(frozen=True, kw_only=True, eq=False)
class StudyRecord:
    """One finished study as read from its output folder.

    Attributes:
        label: A short name, unique among the compared studies.
        path: The study's output folder.
        name: The study's configured name.
        model, revision: The model studied.
        n_layers: The model's number of transformer blocks (relative depth is ``layer / n_layers``).
        personas: The study's persona set (analysed and excluded), in its order.
        reference: The reference persona.
        seeds: The marker training seeds.
        sweep: The layer sweep, as ``LayerSweep.to_dict()``.
        report: The robustness report, as ``Robustness.to_dict()`` plus ``layer``.
        counts: One row per (persona, seed): the source persona's marker count ``k`` of ``n``
            under its own adapter trained with that seed.
        config: The resolved study config.
        recomputed_on: The personas the sweep and report were recomputed on (``intersect``), or
        None.
    """

    label: str
    path: Path
    name: str
    model: str
    revision: str | None
    n_layers: int
    personas: tuple[str, ...]
    reference: str
    seeds: tuple[int, ...]
    sweep: dict[str, Any] = field(repr=False)
    report: dict[str, Any] = field(repr=False)
    counts: pd.DataFrame = field(repr=False)
    config: dict[str, Any] = field(repr=False)
    recomputed_on: tuple[str, ...] | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """The swept layers."""
        return tuple(int(v) for v in self.sweep["layers"])

    @property
    def statistic(self) -> str:
        """The statistic the study's sweep ranked layers by."""
        return str(self.sweep["statistic"])

    @property
    def primary_layer(self) -> int | None:
        """The layer declared in advance, or None."""
        return self.sweep.get("primary_layer")

    @property
    def conclusion_layer(self) -> int:
        """The layer the study's conclusions are drawn at: the primary one, else the report's."""
        return int(self.primary_layer if self.primary_layer is not None else self.report["layer"])

    def relative_depth(self) -> Float[np.ndarray, " layer"]:
        """Returns ``layer / n_layers`` for every swept layer."""
        return np.array(self.layers, dtype=np.float64) / self.n_layers

    def curve(self, statistic: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(value, p, ci [layer, 2])`` of ``statistic`` per swept layer (NaN where
        null)."""
        group, key = _stat_key(statistic)
        rows = self.sweep["per_layer"]
        value = np.array([_num(r[group][key]) for r in rows])
        p = np.array([_num(r[group]["p"]) for r in rows])
        ci = np.array([[_num(v) for v in r[group]["ci"]] for r in rows]).reshape(len(rows), 2)
        return value, p, ci

    def at(self, layer: int, statistic: str) -> tuple[float, float]:
        """Returns ``(value, p)`` of ``statistic`` at ``layer``."""
        value, p, _ = self.curve(statistic)
        j = self.layers.index(layer)
        return float(value[j]), float(p[j])

    @property
    def n_personas(self) -> int:
        """The number of personas the sweep's statistics were computed over."""
        return int(self.sweep["n_personas"])


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True, kw_only=True, eq=False)
class MetaAnalysis:
    """Random-effects meta-analysis of the per-study correlations at one relative depth.

    Each study contributes its correlation at the swept layer nearest ``depth`` as a Fisher z,
    ``atanh(r)``, with variance ``1 / (n - 3)`` (Pearson) or ``(1 + ρ²/2) / (n - 3)``
    (Spearman; Bonett & Wright 2000). ``combine_effects`` pools them.

    Attributes:
        depth: The requested relative depth; ``depth_choice`` says where it came from.
        statistic: ``"spearman"`` or ``"pearson"``.
        labels, layers, depths: Each study's label, chosen layer and that layer's relative depth.
        r, n, z, variance: Each study's correlation, persona count, Fisher z and its variance.
        method_re: The between-study variance estimator (``"dl"``: DerSimonian–Laird).
        fixed_r, fixed_ci: The fixed-effect estimate and interval, back on the r scale.
        random_r, random_ci, random_p: The random-effects estimate, interval and two-sided p.
        tau2: Between-study variance of z. i2: Share of variation due to heterogeneity.
        q, q_p: Cochran's Q and its chi² p-value (homogeneity test).
        sign_agrees: Whether every study's correlation has the same (nonzero) sign.
    """

    depth: float
    depth_choice: str
    statistic: str
    labels: tuple[str, ...]
    layers: tuple[int, ...]
    depths: Float[np.ndarray, " study"]
    r: Float[np.ndarray, " study"]
    n: tuple[int, ...]
    z: Float[np.ndarray, " study"]
    variance: Float[np.ndarray, " study"]
    method_re: str
    alpha: float
    fixed_r: float
    fixed_ci: tuple[float, float]
    random_r: float
    random_ci: tuple[float, float]
    random_p: float
    tau2: float
    i2: float
    q: float
    q_p: float
    sign_agrees: bool

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per study: label, layer, depth, r, n, z, variance."""
        return pd.DataFrame(
            {
                "study": list(self.labels),
                "layer": list(self.layers),
                "relative_depth": self.depths,
                "r": self.r,
                "n": list(self.n),
                "z": self.z,
                "variance": self.variance,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the estimates, heterogeneity and per-study inputs as a JSON-safe dict."""
        return {
            "depth": self.depth,
            "depth_choice": self.depth_choice,
            "statistic": self.statistic,
            "method_re": self.method_re,
            "alpha": self.alpha,
            "studies": [
                {
                    "study": s,
                    "layer": int(layer),
                    "relative_depth": float(d),
                    "r": json_float(r),
                    "n": int(n),
                    "z": json_float(z),
                    "variance": json_float(v),
                }
                for s, layer, d, r, n, z, v in zip(
                    self.labels,
                    self.layers,
                    self.depths,
                    self.r,
                    self.n,
                    self.z,
                    self.variance,
                    strict=True,
                )
            ],
            "fixed": {"r": json_float(self.fixed_r), "ci": [json_float(v) for v in self.fixed_ci]},
            "random": {
                "r": json_float(self.random_r),
                "ci": [json_float(v) for v in self.random_ci],
                "p": json_float(self.random_p),
            },
            "tau2": json_float(self.tau2),
            "i2": json_float(self.i2),
            "q": json_float(self.q),
            "q_p": json_float(self.q_p),
            "sign_agrees": self.sign_agrees,
        }

    def summary(self) -> str:
        """Returns two lines: the combined estimate and its heterogeneity."""
        name = "ρ" if self.statistic == "spearman" else "r"
        level = round(100 * (1 - self.alpha))
        return (
            f"Combined at relative depth {self.depth:.3f} ({self.depth_choice}; layers "
            f"{', '.join(f'{s} {lay}' for s, lay in zip(self.labels, self.layers, strict=True))}): "
            f"random-effects {name} = {self.random_r:+.3f} [{level}% CI {self.random_ci[0]:+.3f}, "
            f"{self.random_ci[1]:+.3f}], p = {self.random_p:.3g}.\n"
            f"Heterogeneity: τ² = {self.tau2:.4f}, I² = {100 * self.i2:.0f}%, Q = {self.q:.2f} (p "
            f"= {self.q_p:.3g}); "
            "sign "
            f"{'agrees in every study' if self.sign_agrees else 'does NOT agree across studies'}."
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class SeedGroup:
    """Studies of one model and design that differ only in their seeds.

    Attributes:
        model: The shared model.
        studies: The studies' labels.
        pooled: ``PooledCounts``: source counts summed over every (study, seed) replicate.
        wilson: ``[persona, 2]`` Wilson interval of each pooled rate.
        seed_corr: replicate × replicate Spearman correlation of the per-persona rates.
        statistic: The statistic of the conclusions.
        layer_values: Each study's statistic and p at its conclusion layer: ``{label: (layer,
        value, p)}``.
        sign_holds: Whether that statistic has the same nonzero sign in every study.
        significant_in: The studies where it is significant (p < alpha).
        influential_everywhere, influential_somewhere: Personas above Cook's 4/N threshold in
            every study, and in at least one.
    """

    model: str
    studies: tuple[str, ...]
    pooled: Any = field(repr=False)
    wilson: Float[np.ndarray, "persona 2"] = field(repr=False)
    seed_corr: pd.DataFrame = field(repr=False)
    statistic: str
    alpha: float
    layer_values: dict[str, tuple[int, float, float]]
    sign_holds: bool
    significant_in: tuple[str, ...]
    influential_everywhere: tuple[str, ...]
    influential_somewhere: tuple[str, ...]

    @property
    def significant_everywhere(self) -> bool:
        """Whether the conclusion-layer statistic is significant in every study of the group."""
        return len(self.significant_in) == len(self.studies)

    def spread(self) -> pd.DataFrame:
        """Returns per persona the SD (ddof 1), minimum and maximum of the per-replicate rates."""
        per = self.pooled.per_seed
        return pd.DataFrame(
            {"sd": per.std(axis=1, ddof=1), "min": per.min(axis=1), "max": per.max(axis=1)}
        )

    def seed_corr_range(self) -> tuple[float, float]:
        """Returns the smallest and mean off-diagonal seed-to-seed correlation."""
        m = self.seed_corr.to_numpy(dtype=np.float64)
        off = m[~np.eye(len(m), dtype=bool)]
        off = off[np.isfinite(off)]
        return (float(off.min()), float(off.mean())) if off.size else (math.nan, math.nan)

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per persona: pooled k, n, rate, Wilson bounds, spread and per-replicate
        rates."""
        frame = self.pooled.to_frame()
        frame.insert(4, "wilson_low", self.wilson[:, 0])
        frame.insert(5, "wilson_high", self.wilson[:, 1])
        spread = self.spread()
        for col in ("sd", "min", "max"):
            frame.insert(
                frame.columns.get_loc("wilson_high") + 1 + ("sd", "min", "max").index(col),
                f"rate_{col}",
                spread[col].to_numpy(),
            )
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Returns the pooled rates, spread, seed correlations and conclusions as a JSON-safe
        dict."""
        low, mean = self.seed_corr_range()
        spread = self.spread()
        personas = {}
        for i, (p, row) in enumerate(self.pooled.to_dict().items()):
            personas[p] = {
                **row,
                "wilson": [float(self.wilson[i, 0]), float(self.wilson[i, 1])],
                "sd": json_float(spread["sd"].iloc[i]),
                "min": json_float(spread["min"].iloc[i]),
                "max": json_float(spread["max"].iloc[i]),
            }
        return {
            "model": self.model,
            "studies": list(self.studies),
            "replicates": [str(c) for c in self.seed_corr.columns],
            "personas": personas,
            "seed_corr": {
                str(a): {
                    str(b): json_float(self.seed_corr.loc[a, b]) for b in self.seed_corr.columns
                }
                for a in self.seed_corr.index
            },
            "seed_corr_min": json_float(low),
            "seed_corr_mean": json_float(mean),
            "statistic": self.statistic,
            "alpha": self.alpha,
            "conclusions": {
                "layer_values": {
                    s: {"layer": v[0], "value": json_float(v[1]), "p": json_float(v[2])}
                    for s, v in self.layer_values.items()
                },
                "sign_holds": self.sign_holds,
                "significant_in": list(self.significant_in),
                "significant_everywhere": self.significant_everywhere,
                "influential_everywhere": list(self.influential_everywhere),
                "influential_somewhere": list(self.influential_somewhere),
            },
        }

    def summary(self) -> str:
        """Returns a few lines: the pooling, the seed agreement and what holds in every seed."""
        low, mean = self.seed_corr_range()
        name = "ρ" if self.statistic == "spearman" else "r"
        sd = self.spread()["sd"]
        sig = (
            "in every seed"
            if self.significant_everywhere
            else (
                f"only in {', '.join(self.significant_in)}" if self.significant_in else "in no seed"
            )
        )
        return "\n".join(
            [
                f"Seeds of {self.model} ({', '.join(self.studies)}): "
                f"{self.pooled.per_seed.shape[1]} replicates pooled over "
                f"{len(self.pooled.personas)} personas; "
                f"mean per-persona SD of rates {float(sd.mean()):.3f}.",
                f"Seed-to-seed Spearman of rates: min {low:+.3f}, mean {mean:+.3f}.",
                f"Sign of {name} at the conclusion layer "
                f"{'holds in every seed' if self.sign_holds else 'does NOT hold in every seed'}; "
                f"significant (p < {self.alpha}) {sig}; influential in every seed: "
                f"{', '.join(self.influential_everywhere) or 'none'}.",
            ]
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class StudyComparison:
    """Studies side by side, their combined estimate at one relative depth, and their seed groups.

    Attributes:
        studies: The compared studies.
        meta: The meta-analysis at ``meta.depth``.
        seed_groups: One per model and design with more than one study.
        personas: The personas compared.
        intersected: Whether the studies were recomputed on their shared personas.
        dropped: Per study, the personas left out by the intersection.
        not_replicates: Lines saying why studies of one model were not pooled as seeds.
    """

    studies: tuple[StudyRecord, ...]
    meta: MetaAnalysis
    seed_groups: tuple[SeedGroup, ...]
    personas: tuple[str, ...]
    statistic: str
    alpha: float
    intersected: bool = False
    dropped: dict[str, tuple[str, ...]] = field(default_factory=dict)
    not_replicates: tuple[str, ...] = ()

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per study: model, n_layers, primary layer and its value/p, strongest
        layer, max-over-layers p."""
        rows = []
        for s in self.studies:
            primary = s.primary_layer
            pv, pp = s.at(primary, self.statistic) if primary is not None else (math.nan, math.nan)
            best = int(s.sweep["best_layer"])
            bv, bp = s.at(best, self.statistic)
            rows.append(
                {
                    "study": s.label,
                    "model": s.model,
                    "n_layers": s.n_layers,
                    "n_personas": s.n_personas,
                    "seeds": ",".join(map(str, s.seeds)),
                    "primary_layer": primary,
                    "primary_depth": primary / s.n_layers if primary is not None else math.nan,
                    "primary_value": pv,
                    "primary_p": pp,
                    "best_layer": best,
                    "best_depth": best / s.n_layers,
                    "best_value": bv,
                    "best_p": bp,
                    "max_statistic_p": _num(s.sweep["max_statistic"]["p"]),
                }
            )
        return pd.DataFrame(rows)

    def curves(self) -> pd.DataFrame:
        """Returns one row per study and swept layer: relative depth, value, p and bootstrap CI."""
        frames = []
        for s in self.studies:
            value, p, ci = s.curve(self.statistic)
            frames.append(
                pd.DataFrame(
                    {
                        "study": s.label,
                        "layer": list(s.layers),
                        "relative_depth": s.relative_depth(),
                        "value": value,
                        "p": p,
                        "ci_low": ci[:, 0],
                        "ci_high": ci[:, 1],
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict[str, Any]:
        """Returns the whole comparison as a JSON-safe dict."""
        table = self.to_frame()
        studies = []
        for s, row in zip(self.studies, table.to_dict(orient="records"), strict=True):
            value, p, ci = s.curve(self.statistic)
            studies.append(
                {
                    **{k: (json_float(v) if isinstance(v, float) else v) for k, v in row.items()},
                    "path": str(s.path),
                    "name": s.name,
                    "revision": s.revision,
                    "seeds": list(s.seeds),
                    "reference": s.reference,
                    "conclusion_layer": s.conclusion_layer,
                    "influential": list(s.report.get("influential", [])),
                    "recomputed_on": None if s.recomputed_on is None else list(s.recomputed_on),
                    "curve": [
                        {
                            "layer": layer,
                            "relative_depth": layer / s.n_layers,
                            "value": json_float(v),
                            "p": json_float(q),
                            "ci": [json_float(c) for c in c2],
                        }
                        for layer, v, q, c2 in zip(s.layers, value, p, ci, strict=True)
                    ],
                }
            )
        return {
            "statistic": self.statistic,
            "alpha": self.alpha,
            "personas": list(self.personas),
            "intersected": self.intersected,
            "dropped": {k: list(v) for k, v in self.dropped.items()},
            "studies": studies,
            "meta_analysis": self.meta.to_dict(),
            "seed_groups": [g.to_dict() for g in self.seed_groups],
            "not_replicates": list(self.not_replicates),
        }

    def summary(self) -> str:
        """Returns a few lines per study, the combined estimate and each seed group's
        conclusions."""
        name = "ρ" if self.statistic == "spearman" else "r"
        lines = [
            f"Comparison of {len(self.studies)} studies over {len(self.personas)} personas "
            f"(statistic {self.statistic})."
        ]
        if self.intersected:
            lines.append(
                f"Recomputed on the {len(self.personas)} personas every study shares; left out: "
                + "; ".join(f"{k}: {', '.join(v)}" for k, v in self.dropped.items() if v)
                + "."
            )
        for row in self.to_frame().itertuples():
            primary = (
                "no primary layer"
                if row.primary_layer is None or pd.isna(row.primary_layer)
                else (
                    f"primary layer {int(row.primary_layer)} (depth {row.primary_depth:.2f}): "
                    f"{name} = {row.primary_value:+.3f}, p = {row.primary_p:.3g}"
                )
            )
            lines.append(
                f"  {row.study}: {row.model}, {row.n_layers} blocks; {primary}; strongest layer "
                f"{row.best_layer} "
                f"(depth {row.best_depth:.2f}, {name} = {row.best_value:+.3f}); max-over-layers p "
                f"= {row.max_statistic_p:.3g}."
            )
        lines.append(self.meta.summary())
        lines += [g.summary() for g in self.seed_groups]
        lines += list(self.not_replicates)
        return "\n".join(lines)

    def figure(self, *, title: str | None = None) -> Any:
        """Returns the studies' sweep curves against relative depth, with bootstrap bands
        (plotly)."""
        import plotly.graph_objects as go

        from persona_geometry.analysis.figures import _PALETTE

        # The figures' palette with red second, so that two studies contrast.
        palette = (_PALETTE[0], _PALETTE[3], _PALETTE[2], _PALETTE[1], *_PALETTE[4:])
        name = "Spearman ρ" if self.statistic == "spearman" else "Pearson r"
        fig = go.Figure()
        for i, s in enumerate(self.studies):
            color = palette[i % len(palette)]
            x = s.relative_depth()
            value, p, ci = s.curve(self.statistic)
            if np.isfinite(ci).all():
                rgb = tuple(int(color[j : j + 2], 16) for j in (1, 3, 5))
                fig.add_trace(
                    go.Scatter(
                        x=np.concatenate([x, x[::-1]]),
                        y=np.concatenate([ci[:, 1], ci[::-1, 0]]),
                        fill="toself",
                        fillcolor=f"rgba({rgb[0]},{rgb[1]},{rgb[2]},0.15)",
                        line={"width": 0},
                        hoverinfo="skip",
                        name=f"{s.label} bootstrap CI",
                        legendgroup=s.label,
                    )
                )
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=value,
                    mode="lines+markers",
                    line={"color": color},
                    name=f"{s.label} ({s.n_layers} blocks)",
                    legendgroup=s.label,
                    customdata=np.column_stack([s.layers, p]),
                    hovertemplate="layer %{customdata[0]:.0f} (depth %{x:.2f})<br>%{y:.3f}<br>"
                    "p=%{customdata[1]:.3g}<extra></extra>",
                )
            )
        fig.add_hline(y=0, line={"color": "#999", "width": 1})
        m = self.meta
        fig.add_vline(
            x=m.depth,
            line={"color": "#555", "dash": "dot"},
            annotation_text=f"combined {m.random_r:+.2f} at {m.depth:.2f}",
        )
        fig.update_layout(
            title=title
            or f"{name} of cosine vs source rate by relative depth, {len(self.studies)} studies",
            xaxis_title="relative depth (layer / number of blocks)",
            yaxis_title=f"{name} with source rate",
            yaxis_range=[-1.05, 1.05],
            template="plotly_white",
        )
        return fig


# --- reading a study ----------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(
            f"{path.parent.parent} is not a finished study: no "
            f"{path.relative_to(path.parent.parent)} ({what})."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from e


def _activation_dirs(path: Path) -> list[Path]:
    """Returns the study's activation folders: one, or one per persona block of a sharded
    extraction."""
    marker = path / "extract" / ".stage.json"
    try:
        files = json.loads(marker.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError):
        return []
    return [Path(v) for k, v in files.items() if k == "activations" or k.startswith("activations:")]


def _n_layers(path: Path, config: dict[str, Any], sweep: dict[str, Any]) -> int:
    """Returns the model's number of blocks: from the extraction manifest, else the full sweep."""
    dirs = _activation_dirs(path)
    acts = dirs[0] if dirs else None
    if acts is not None and (acts / "manifest.json").is_file():
        provenance = json.loads((acts / "manifest.json").read_text(encoding="utf-8")).get(
            "provenance", {}
        )
        if provenance.get("n_layers"):
            return int(provenance["n_layers"])
    if config.get("extract", {}).get("layers") is None:  # every block was extracted and swept
        return len(sweep["layers"])
    raise ValueError(
        f"{path}: the number of blocks is unknown (no extraction manifest, and extract.layers is a "
        "subset); give n_layers."
    )


def _counts(path: Path, seeds: Sequence[int]) -> pd.DataFrame:
    """Returns the source counts per (persona, seed) from every
    ``eval/<source>/seed<k>/run_result.json``."""
    rows = []
    for seed in seeds:
        for result_path in sorted((path / "eval").glob(f"*/seed{seed}/run_result.json")):
            result = json.loads(result_path.read_text(encoding="utf-8"))
            source = result.get("source") or result_path.parent.parent.name
            row = next((r for r in result["personas"] if r["persona"] == source), None)
            if row is None:
                raise ValueError(f"{result_path} has no entry for its source persona {source!r}.")
            rows.append(
                {"persona": source, "seed": int(seed), "k": int(row["k"]), "n": int(row["n"])}
            )
    return pd.DataFrame(rows, columns=["persona", "seed", "k", "n"])


def read_study(
    path: str | os.PathLike[str], *, label: str | None = None, n_layers: int | None = None
) -> StudyRecord:
    """Returns a finished study's record, read from the output folder ``run_study`` wrote.

    Args:
        path: The study's output folder (the config's ``out``).
        label: A short name for tables and figures (default: the study's name).
        n_layers: The model's number of blocks, when the extraction manifest is not there.

    Raises:
        ValueError: If the folder lacks ``config.resolved.yaml``, ``sweep/sweep.json`` or
            ``report/report.json``, or the number of blocks cannot be found.
    """
    import yaml

    path = Path(path)
    config_path = path / "config.resolved.yaml"
    if not config_path.is_file():
        invalid(
            "path", "read_study", "a study output folder (with config.resolved.yaml)", str(path)
        )
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    sweep = _read_json(path / "sweep" / "sweep.json", "run the 'sweep' stage")
    report = _read_json(path / "report" / "report.json", "run the 'report' stage")
    personas = tuple(dict.fromkeys([*sweep["personas"], *sweep.get("excluded", [])]))
    seeds = tuple(int(s) for s in config.get("marker", {}).get("seeds", [42]))
    return StudyRecord(
        label=label or str(config.get("name") or path.name),
        path=path,
        name=str(config.get("name", path.name)),
        model=str(report.get("model") or config["model"]["name"]),
        revision=config.get("model", {}).get("revision"),
        n_layers=int(n_layers) if n_layers is not None else _n_layers(path, config, sweep),
        personas=personas,
        reference=str(config.get("geometry", {}).get("reference") or sweep.get("reference")),
        seeds=seeds,
        sweep=sweep,
        report=report,
        counts=_counts(path, seeds),
        config=config,
    )


def _recompute(study: StudyRecord, personas: Sequence[str]) -> StudyRecord:
    """Returns ``study`` with its sweep and report recomputed on ``personas`` (its own settings)."""
    import dataclasses

    from persona_geometry.activations import ActivationSet
    from persona_geometry.analysis import layer_sweep, robustness_at_layer
    from persona_geometry.extend import concat_personas
    from persona_geometry.geometry import center, centroids, cosine_to_reference

    dirs = _activation_dirs(study.path)
    if not dirs or not all(d.exists() for d in dirs):
        raise ValueError(
            f"{study.path}: recomputing on shared personas needs the study's cached activations, "
            "which are gone."
        )
    geometry = study.config.get("geometry", {})
    if isinstance(geometry.get("centering"), str):
        raise ValueError(
            f"{study.path}: a study centred on a separate persona file cannot be recomputed on "
            "shared personas."
        )
    acts = ActivationSet.load(dirs[0])
    for d in dirs[1:]:
        acts = concat_personas(acts, ActivationSet.load(d))
    keep = [p for p in acts.personas.names if p in set(personas)]
    cents = centroids(acts.select(personas=keep), hook=geometry.get("hook", "resid_post"))
    centering = geometry.get("centering")
    cos = cosine_to_reference(
        center(cents, [c for c in centering if c in keep] if centering else None), study.reference
    )
    pooled = study.counts.groupby("persona")[["k", "n"]].sum()
    names = [p for p in keep if p in pooled.index]
    a = study.config.get("analysis", {})
    reference = study.reference if study.reference in names else None
    exclude_reference = bool(a.get("exclude_reference", False))
    sweep = layer_sweep(
        cos.to_wide().loc[names],
        k=pooled.loc[names, "k"].to_numpy(),
        n=pooled.loc[names, "n"].to_numpy(),
        reference=reference,
        exclude=[reference] if exclude_reference and reference else None,
        primary_layer=a.get("primary_layer"),
        n_permutations=int(a.get("n_permutations", 10_000)),
        n_bootstrap=int(a.get("n_bootstrap", 2_000)),
        statistic=a.get("statistic", "spearman"),
        seed=int(a.get("seed", 0)),
    )
    layer = (
        a.get("layer")
        if a.get("layer") is not None
        else (sweep.primary_layer if sweep.primary_layer is not None else sweep.best_layer)
    )
    at_layer = cos.at(layer)
    categories = dict(zip(cos.personas, cos.categories, strict=True))
    rob = robustness_at_layer(
        [at_layer[p] for p in names],
        k=pooled.loc[names, "k"].to_numpy(),
        n=pooled.loc[names, "n"].to_numpy(),
        personas=names,
        categories=[categories[p] for p in names],
        reference=reference,
        exclude_reference=exclude_reference,
        layer=layer,
    )
    report = {**rob.to_dict(), "model": study.model, "layer": layer}
    counts = study.counts[study.counts["persona"].isin(names)].reset_index(drop=True)
    return dataclasses.replace(
        study,
        sweep=sweep.to_dict(),
        report=report,
        counts=counts,
        personas=tuple(keep),
        recomputed_on=tuple(names),
    )


# --- comparing ----------------------------------------------------------------------------------
def _unique_labels(studies: Sequence[StudyRecord]) -> list[str]:
    candidates = [
        [s.label for s in studies],
        [s.path.name for s in studies],
        [f"{s.path.parent.name}/{s.path.name}" for s in studies],
    ]
    for labels in candidates:
        if len(set(labels)) == len(labels):
            return labels
    return [f"{s.label} #{i + 1}" for i, s in enumerate(studies)]


def _check_personas(
    studies: Sequence[StudyRecord], intersect: bool
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """Returns the shared personas and what each study drops; raises when they differ and not
    ``intersect``."""
    references = {s.reference for s in studies}
    if len(references) > 1:
        got = ", ".join(f"{s.label}: {s.reference}" for s in studies)
        invalid("studies", "compare_studies", "studies with one reference persona", got)
    first = studies[0]
    shared = [p for p in first.personas if all(p in s.personas for s in studies)]
    dropped = {s.label: tuple(p for p in s.personas if p not in shared) for s in studies}
    if any(dropped.values()) and not intersect:
        diffs = "; ".join(
            f"{s.label} lacks {sorted(set(first.personas) - set(s.personas))} and adds "
            f"{sorted(set(s.personas) - set(first.personas))}"
            for s in studies[1:]
            if set(s.personas) != set(first.personas)
        )
        invalid(
            "studies",
            "compare_studies",
            f"studies over the same personas as {first.label} (or intersect=True)",
            diffs,
        )
    if len(shared) < 4:
        invalid("studies", "compare_studies", "studies sharing at least 4 personas", shared)
    return tuple(shared), dropped


def _nearest_layer(study: StudyRecord, depth: float) -> int:
    depths = study.relative_depth()
    return study.layers[
        int(np.argmin(np.abs(depths - depth)))
    ]  # argmin takes the lower layer on a tie


def _fisher(r: float, n: int, statistic: str) -> tuple[float, float]:
    """Returns Fisher z of ``r`` and its variance (Bonett–Wright for Spearman)."""
    clipped = float(np.clip(r, -_R_MAX, _R_MAX))
    variance = (1.0 + clipped**2 / 2.0) / (n - 3) if statistic == "spearman" else 1.0 / (n - 3)
    return math.atanh(clipped), variance


def _meta_analysis(
    studies: Sequence[StudyRecord],
    depth: float,
    depth_choice: str,
    statistic: str,
    method_re: str,
    alpha: float,
) -> MetaAnalysis:
    from scipy import stats
    from statsmodels.stats.meta_analysis import combine_effects

    layers = [_nearest_layer(s, depth) for s in studies]
    r = np.array([s.at(layer, statistic)[0] for s, layer in zip(studies, layers, strict=True)])
    n = [s.n_personas for s in studies]
    if any(v <= 3 for v in n):
        invalid(
            "studies",
            "compare_studies",
            "studies of at least 4 personas (Fisher z needs n > 3)",
            dict(zip([s.label for s in studies], n, strict=True)),
        )
    if not np.isfinite(r).all():
        bad = [s.label for s, v in zip(studies, r, strict=True) if not np.isfinite(v)]
        invalid(
            "depth",
            "compare_studies",
            "a depth where every study has a correlation",
            f"none (constant data) for {bad}",
        )
    if (np.abs(r) > _R_MAX).any():
        log.warning(
            "a correlation of ±1 enters the meta-analysis at |r| = %s (its Fisher z is infinite)",
            _R_MAX,
        )
    zv = [_fisher(v, k, statistic) for v, k in zip(r, n, strict=True)]
    z = np.array([a for a, _ in zv])
    var = np.array([b for _, b in zv])
    res = combine_effects(
        z, var, method_re=method_re, row_names=[s.label for s in studies], alpha=alpha
    )
    frame = res.summary_frame()
    fixed, rand = frame.loc["fixed effect"], frame.loc["random effect"]
    tau2, sd_random = float(res.tau2), float(res.sd_eff_w_re)
    if tau2 < 0:
        # statsmodels' one-step (dl, chi2) estimate is (Q - df) / c, not truncated at zero when
        # Q < df; DerSimonian-Laird truncates it, and with tau² = 0 random effects are fixed
        # effects.
        tau2, rand, sd_random = 0.0, fixed, float(res.sd_eff_w_fe)
    p_random = float(2 * stats.norm.sf(abs(rand["eff"] / sd_random)))
    signs = np.sign(r)
    return MetaAnalysis(
        depth=float(depth),
        depth_choice=depth_choice,
        statistic=statistic,
        labels=tuple(s.label for s in studies),
        layers=tuple(int(v) for v in layers),
        depths=np.array([layer / s.n_layers for s, layer in zip(studies, layers, strict=True)]),
        r=r,
        n=tuple(n),
        z=z,
        variance=var,
        method_re=method_re,
        alpha=alpha,
        fixed_r=math.tanh(fixed["eff"]),
        fixed_ci=(math.tanh(fixed["ci_low"]), math.tanh(fixed["ci_upp"])),
        random_r=math.tanh(rand["eff"]),
        random_ci=(math.tanh(rand["ci_low"]), math.tanh(rand["ci_upp"])),
        random_p=p_random,
        tau2=tau2,
        i2=max(
            0.0, float(res.i2)
        ),  # I² is truncated at 0 (Higgins & Thompson); statsmodels reports (Q - df) / Q
        q=float(res.q),
        q_p=float(res.test_homogeneity().pvalue),
        sign_agrees=bool(signs[0] != 0 and (signs == signs[0]).all()),
    )


def _design(config: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Returns the config flattened to ``{key path: value}`` without names, paths, devices and
    seeds."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in config.items():
        path = (*prefix, str(key))
        if path in _NOT_DESIGN or key in _SEED_KEYS:
            continue
        if isinstance(value, Mapping):
            flat.update(_design(value, path))
        elif isinstance(value, str) and _is_file(value):
            # Persona, question and template files count by their content, not where they sit.
            flat[path] = "sha256:" + hashlib.sha256(Path(value).read_bytes()).hexdigest()
        else:
            flat[path] = value
    return flat


def _is_file(value: str) -> bool:
    try:
        return "\n" not in value and Path(value).is_file()
    except OSError:  # a string too long to be a path (e.g. an inline template)
        return False


def _seed_groups(
    studies: Sequence[StudyRecord], statistic: str, alpha: float
) -> tuple[list[SeedGroup], list[str]]:
    by_model: dict[tuple[str, str | None], list[StudyRecord]] = {}
    for s in studies:
        by_model.setdefault((s.model, s.revision), []).append(s)
    groups, notes = [], []
    for (model, _), members in by_model.items():
        designs: dict[str, list[StudyRecord]] = {}
        for s in members:
            designs.setdefault(
                json.dumps(
                    sorted((".".join(k), v) for k, v in _design(s.config).items()), default=str
                ),
                [],
            ).append(s)
        if len(designs) > 1:
            first, *others = list(designs.values())
            base = _design(first[0].config)
            for group in others:
                other = _design(group[0].config)
                keys = sorted(
                    ".".join(k) for k in set(base) | set(other) if base.get(k) != other.get(k)
                )
                notes.append(
                    f"Not pooled as seeds of {model}: {first[0].label} and {group[0].label} differ "
                    f"in {', '.join(keys)}."
                )
        for group in designs.values():
            if len(group) > 1:
                groups.append(_seed_group(model, group, statistic, alpha))
    return groups, notes


def _seed_group(
    model: str, studies: Sequence[StudyRecord], statistic: str, alpha: float
) -> SeedGroup:
    from persona_geometry.analysis import pool_seeds
    from persona_geometry.stats import wilson_interval

    all_seeds = [seed for s in studies for seed in s.seeds]
    clash = len(set(all_seeds)) != len(all_seeds)
    frames = []
    for s in studies:
        c = s.counts.copy()
        c["seed"] = [f"{s.label}:{v}" if clash else str(v) for v in c["seed"]]
        frames.append(c)
    table = pd.concat(frames, ignore_index=True)
    pooled = pool_seeds(table)
    missing = pooled.per_seed.columns[pooled.per_seed.isna().any(axis=0)].tolist()
    if missing:
        log.warning(
            "seed replicates %s lack some personas' counts; their rates are NaN there", missing
        )
    low, high = wilson_interval(pooled.k, pooled.n, alpha=alpha)
    seed_corr = pooled.per_seed.corr(method="spearman")
    values = {}
    for s in studies:
        layer = s.conclusion_layer
        values[s.label] = (layer, *s.at(layer, statistic))
    signs = np.sign([v[1] for v in values.values()])
    influential = [set(s.report.get("influential", [])) for s in studies]
    everywhere = set.intersection(*influential)
    somewhere = set.union(*influential)
    order = list(pooled.personas)
    return SeedGroup(
        model=model,
        studies=tuple(s.label for s in studies),
        pooled=pooled,
        wilson=np.column_stack([low, high]),
        seed_corr=seed_corr,
        statistic=statistic,
        alpha=alpha,
        layer_values=values,
        sign_holds=bool(signs[0] != 0 and (signs == signs[0]).all()),
        significant_in=tuple(label for label, v in values.items() if v[2] < alpha),
        influential_everywhere=tuple(
            sorted(everywhere, key=lambda p: order.index(p) if p in order else len(order))
        ),
        influential_somewhere=tuple(
            sorted(somewhere, key=lambda p: order.index(p) if p in order else len(order))
        ),
    )


def compare_studies(
    studies: Sequence[str | os.PathLike[str] | StudyRecord],
    *,
    depth: float | None = None,
    statistic: str | None = None,
    intersect: bool = False,
    method_re: str = "dl",
    alpha: float = 0.05,
) -> StudyComparison:
    """Returns finished studies side by side, combined at one relative depth, pooled over seeds.

    Args:
        studies: Two or more study output folders (or ``read_study`` records).
        depth: The relative depth ``layer / n_layers`` in [0, 1] of the meta-analysis; each
            study contributes its swept layer nearest to it (the lower one on a tie). Default:
            the first study's primary layer's depth, else its strongest layer's (exploratory).
        statistic: ``"spearman"`` or ``"pearson"`` (default: the first study's sweep statistic).
        intersect: Compare on the personas every study shares, recomputing each study's sweep
            and report there; without it, studies over different personas are refused.
        method_re: Between-study variance estimator of ``combine_effects``: ``"dl"``
            (DerSimonian–Laird), ``"iterated"`` (Paule–Mandel) or ``"chi2"``.
        alpha: Significance level of the conclusions and 1 - level of every interval.

    Returns:
        A ``StudyComparison``.

    Raises:
        ValueError: On fewer than two studies, a folder that is not a finished study, studies
            whose personas or reference persona differ (without ``intersect``), or a bad argument.
    """
    func = "compare_studies"
    if isinstance(studies, str | os.PathLike | StudyRecord):
        invalid(
            "studies", func, "a list of two or more study output folders", studies, exc=TypeError
        )
    studies = list(studies)
    if len(studies) < 2:
        invalid("studies", func, "two or more study output folders", [str(s) for s in studies])
    alpha = check_probability(alpha, "alpha", func)
    method_re = check_one_of(method_re, "method_re", func, META_METHODS)
    if depth is not None and (
        isinstance(depth, bool)
        or not isinstance(depth, int | float)
        or not 0.0 <= float(depth) <= 1.0
    ):
        invalid("depth", func, "a relative depth in [0, 1]", depth)  # before any study is read
    records = [s if isinstance(s, StudyRecord) else read_study(s) for s in studies]
    import dataclasses

    records = [
        dataclasses.replace(s, label=label)
        for s, label in zip(records, _unique_labels(records), strict=True)
    ]
    statistic = check_one_of(
        statistic if statistic is not None else records[0].statistic, "statistic", func, STATISTICS
    )
    shared, dropped = _check_personas(records, intersect)
    intersected = intersect and any(dropped.values())
    if intersected:
        log.info(
            "comparing on the %d shared personas; recomputing each study's sweep there", len(shared)
        )
        records = [_recompute(s, shared) if dropped[s.label] else s for s in records]
    first = records[0]
    if depth is None:
        layer = (
            first.primary_layer
            if first.primary_layer is not None
            else int(first.sweep["best_layer"])
        )
        depth = layer / first.n_layers
        kind = "primary" if first.primary_layer is not None else "strongest (exploratory)"
        choice = f"{first.label}'s {kind} layer {layer}"
    else:
        depth, choice = float(depth), "requested"
    meta = _meta_analysis(records, depth, choice, statistic, method_re, alpha)
    groups, notes = _seed_groups(records, statistic, alpha)
    return StudyComparison(
        studies=tuple(records),
        meta=meta,
        seed_groups=tuple(groups),
        personas=shared,
        statistic=statistic,
        alpha=alpha,
        intersected=intersected,
        dropped={k: v for k, v in dropped.items() if v} if intersected else {},
        not_replicates=tuple(notes),
    )


# --- writing --------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = "+.3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def comparison_markdown(result: StudyComparison, *, title: str = "Comparing studies") -> str:
    """Returns the comparison as Markdown: studies table, combined estimate, seed groups."""
    name = "ρ" if result.statistic == "spearman" else "r"
    parts = [f"# {title}", "", result.summary().split("\n")[0], ""]
    if result.intersected:
        parts += [
            "**Compared on the personas every study shares** (each study's sweep and report "
            "recomputed there); left out: "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in result.dropped.items())
            + ".",
            "",
        ]
    header = [
        "study",
        "model",
        "blocks",
        "personas",
        "seeds",
        "primary layer (depth)",
        f"{name}",
        "p",
        "strongest layer (depth)",
        f"{name}",
        "max-over-layers p",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in result.to_frame().itertuples():
        primary = (
            "—"
            if row.primary_layer is None or pd.isna(row.primary_layer)
            else f"{int(row.primary_layer)} ({row.primary_depth:.2f})"
        )
        cells = [
            row.study,
            f"`{row.model}`",
            str(row.n_layers),
            str(row.n_personas),
            row.seeds,
            primary,
            _fmt(row.primary_value),
            _fmt(row.primary_p, ".3g"),
            f"{row.best_layer} ({row.best_depth:.2f})",
            _fmt(row.best_value),
            _fmt(row.max_statistic_p, ".3g"),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    parts += lines
    parts += ["", "## Combined estimate", "", result.meta.summary().replace("\n", "  \n"), ""]
    m = result.meta
    lines = [
        "| study | layer | depth | " + name + " | n | Fisher z | variance |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in m.to_frame().itertuples():
        lines.append(
            f"| {row.study} | {row.layer} | {row.relative_depth:.3f} | {row.r:+.3f} | {row.n} | "
            f"{row.z:+.3f} | {row.variance:.4f} |"
        )
    parts += lines + [
        "",
        "Fisher z per study, variance "
        f"{'(1 + ρ²/2)/(n − 3) (Bonett–Wright)' if m.statistic == 'spearman' else '1/(n − 3)'}; "
        f"pooled by statsmodels `combine_effects` (random effects, {m.method_re}); "
        "back-transformed with tanh.",
        "",
    ]
    for g in result.seed_groups:
        parts += [f"## Seeds of `{g.model}`", "", g.summary().replace("\n", "  \n"), ""]
        frame = g.to_frame()
        reps = [c for c in frame.columns if c.startswith("rate_seed_")]
        head = [
            "persona",
            "k/n",
            "pooled rate",
            f"Wilson {round(100 * (1 - g.alpha))}% CI",
            "SD",
            "min",
            "max",
            *[c.removeprefix("rate_seed_") for c in reps],
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        for _, row in frame.iterrows():
            lines.append(
                f"| {row['persona']} | {int(row['k'])}/{int(row['n'])} | {row['rate']:.3f} | "
                f"[{row['wilson_low']:.3f}, {row['wilson_high']:.3f}] | "
                f"{_fmt(row['rate_sd'], '.3f')} | {row['rate_min']:.3f} | {row['rate_max']:.3f} | "
                + " | ".join(_fmt(row[c], ".3f") for c in reps)
                + " |"
            )
        parts += lines + [""]
    if result.not_replicates:
        parts += ["## Not pooled", ""] + [f"- {line}" for line in result.not_replicates] + [""]
    return "\n".join(parts)


def write_comparison(result: StudyComparison, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Writes ``compare.json``, ``compare.md``, ``studies.csv``, ``curves.csv`` and
    ``compare_sweeps.html`` atomically; returns their paths."""
    from persona_geometry._io import atomic_write_json, atomic_write_text
    from persona_geometry.analysis import write_figure
    from persona_geometry.provenance import package_versions

    out = Path(out)
    payload = {
        **result.to_dict(),
        "provenance": {
            "tool": "persona_geometry.analysis.compare_studies",
            "studies": [str(s.path) for s in result.studies],
            "package_versions": package_versions(),
        },
    }
    written = {
        "json": atomic_write_json(out / "compare.json", payload),
        "markdown": atomic_write_text(out / "compare.md", comparison_markdown(result)),
        "studies_csv": atomic_write_text(
            out / "studies.csv", result.to_frame().to_csv(index=False)
        ),
        "curves_csv": atomic_write_text(out / "curves.csv", result.curves().to_csv(index=False)),
        "figure": write_figure(result.figure(), out / "compare_sweeps.html"),
    }
    for kind, path in written.items():
        log.info("wrote %s %s", kind, path)
    return written
