"""Reports: the Markdown write-up and the JSON files of an analysis or a layer sweep.

``analyze_table`` and ``sweep_table`` are what the ``analyze`` and ``sweep`` commands call: they
read a table, compute, and write the requested files atomically, each JSON carrying its
provenance (tool, input file and its hash, arguments, package versions). The JSON of
``analyze`` follows ``SCHEMA`` (see ``persona_geometry.analysis.robustness.SCHEMA``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from persona_geometry._io import atomic_write_json, atomic_write_text
from persona_geometry._validation import check_one_of, invalid
from persona_geometry.analysis.robustness import SCHEMA, Robustness, analyze, read_table
from persona_geometry.analysis.sweep import LayerSweep, layer_sweep
from persona_geometry.provenance import package_versions
from persona_geometry.settings import TABLE_LAYOUTS
from persona_geometry.stats import check_rates

__all__ = [
    "SCHEMA",
    "analyze_table",
    "read_sweep_table",
    "robustness_markdown",
    "sweep_markdown",
    "sweep_table",
    "write_analysis",
]

log = logging.getLogger(__name__)

# Wide sweep tables name layer columns "12", "layer_12", "layer12", "L12", "cos_12", "cos_l12" or
# "cosine_layer_12"; the first group is the layer index.
LAYER_COLUMN_PATTERN = r"^(?:layer_?|[lL]|cos(?:ine)?_?(?:[lL](?:ayer)?_?)?)?(\d+)$"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    v = float(value)
    if not math.isfinite(v):
        return "—"
    return f"{v:.{digits}f}"


def _fmt_p(value: Any) -> str:
    if value is None or not math.isfinite(float(value)):
        return "—"
    v = float(value)
    return f"{v:.2e}" if v < 1e-3 else f"{v:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def robustness_markdown(
    result: Robustness, sweep: LayerSweep | None = None, *, title: str | None = None
) -> str:
    """Returns a Markdown write-up: headline table, per-layer statistics (with a sweep), robustness
    table."""
    c = result.correlation
    where = f" at layer {result.layer}" if result.layer is not None else ""
    parts = [f"# {title or 'Persona geometry vs source rate'}", ""]
    parts.append(
        f"Across **{c.n} personas**{where}, the source rate correlates with {result.x_name}: "
        f"Pearson r = {c.pearson_r:+.3f} (p = {_fmt_p(c.pearson_p)}), Spearman ρ = "
        f"{c.spearman_rho:+.3f} "
        f"(p = {_fmt_p(c.spearman_p)})."
    )
    if sweep is not None:
        parts.append("")
        parts.append(sweep.summary().replace("\n", "  \n"))
    parts += ["", "## Personas", ""]
    held = {h.persona for h in result.holdout}
    order = np.argsort(result.x, kind="stable")
    rows = []
    for i in order:
        p = result.personas[i]
        lo, hi = result.wilson.get(p, (math.nan, math.nan))
        counts = (
            "—"
            if result.k is None or result.n is None
            else f"{int(result.k[i])}/{int(result.n[i])}"
        )
        role = "held out" if p in held else ("reference" if p == result.reference else "")
        rows.append(
            [
                p,
                _fmt(result.x[i]),
                _fmt(result.rate[i]),
                counts,
                f"[{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) else "—",
                result.categories[i],
                role,
            ]
        )
    parts.append(
        _table(
            [
                "persona",
                result.x_name,
                "rate",
                "k/n",
                f"Wilson {round(100 * (1 - result.alpha))}% CI",
                "category",
                "role",
            ],
            rows,
        )
    )
    if sweep is not None:
        parts += ["", "## Per-layer statistics", "", sweep_markdown(sweep, heading=False)]
    parts += ["", "## Robustness", "", _table(["check", "result"], _robustness_rows(result))]
    return "\n".join(parts) + "\n"


def _robustness_rows(result: Robustness) -> list[list[str]]:
    fit = result.fit
    rows = [
        [
            f"OLS fit (n = {fit.n})",
            f"rate = {fit.intercept:.3f} {fit.slope:+.3f} × {result.x_name}; R² = {fit.r2:.3f}; "
            f"slope p = {_fmt_p(fit.slope_p)}",
        ]
    ]
    for h in result.holdout:
        rows.append(
            [
                f"held out: {h.persona}",
                f"observed {h.observed:.3f}, predicted {h.predicted:.3f}, "
                f"{round(100 * (1 - result.alpha))}% PI [{h.pi_lower:.3f}, {h.pi_upper:.3f}] → "
                f"{'inside' if h.inside else '**outside**'}",
            ]
        )
    loo = result.loo_coverage
    if loo.total:
        rows.append(["leave-one-out PI coverage", f"{loo.covered}/{loo.total}"])
    inf = result.influence
    rows.append(
        [
            "Cook's distance",
            f"threshold 4/N = {inf.threshold:.3f}; above: {', '.join(inf.influential) or 'none'}; "
            f"largest: {inf.most_influential} ({inf.cooks_distance.max():.3f})",
        ]
    )
    w = inf.without_most_influential
    rows.append(
        [
            f"without {inf.most_influential} (n = {w.n})",
            f"r = {_fmt(w.pearson_r)} (p = {_fmt_p(w.pearson_p)}), ρ = {_fmt(w.spearman_rho)} (p = "
            f"{_fmt_p(w.spearman_p)})",
        ]
    )
    if result.partial_spearman is not None:
        ps = result.partial_spearman
        rows.append(
            [
                f"partial Spearman | {ps.covariate}",
                f"ρ = {_fmt(ps.rho)} (p = {_fmt_p(ps.p)}), VIF = {_fmt(ps.vif, 2)}",
            ]
        )
    if result.without_reference is not None:
        wr = result.without_reference
        rows.append(
            [
                f"without reference {result.reference} (n = {wr.n})",
                f"r = {_fmt(wr.pearson_r)} (p = {_fmt_p(wr.pearson_p)}), ρ = "
                f"{_fmt(wr.spearman_rho)} (p = {_fmt_p(wr.spearman_p)})",
            ]
        )
    for cat in result.within_category:
        if cat.correlation is None:
            rows.append(
                [f"within {cat.category} (n = {len(cat.personas)})", f"skipped: {cat.skipped}"]
            )
        else:
            cc = cat.correlation
            rows.append(
                [
                    f"within {cat.category} (n = {cc.n})",
                    f"r = {_fmt(cc.pearson_r)} (p = {_fmt_p(cc.pearson_p)}), ρ = "
                    f"{_fmt(cc.spearman_rho)} (p = {_fmt_p(cc.spearman_p)})",
                ]
            )
    return rows


def sweep_markdown(sweep: LayerSweep, *, heading: bool = True) -> str:
    """Returns the per-layer statistics table (strongest layer marked *, primary layer †)."""
    rows = []
    for j, layer in enumerate(sweep.layers):
        mark = ("*" if layer == sweep.best_layer else "") + (
            "†" if layer == sweep.primary_layer else ""
        )
        rows.append(
            [
                f"{layer}{mark}",
                _fmt(sweep.pearson_r[j]),
                _fmt_p(sweep.pearson_p[j]),
                _fmt_p(sweep.pearson_p_holm[j]),
                f"[{_fmt(sweep.pearson_ci[j, 0], 2)}, {_fmt(sweep.pearson_ci[j, 1], 2)}]",
                _fmt(sweep.spearman_rho[j]),
                _fmt_p(sweep.spearman_p[j]),
                _fmt_p(sweep.spearman_p_holm[j]),
                f"[{_fmt(sweep.spearman_ci[j, 0], 2)}, {_fmt(sweep.spearman_ci[j, 1], 2)}]",
                _fmt_p(sweep.p_maxt[j]),
            ]
        )
    table = _table(
        ["layer", "r", "p", "p (Holm)", "r CI", "ρ", "p", "p (Holm)", "ρ CI", "p (max-T)"], rows
    )
    note = (
        f"\n\n\\* strongest layer by |{sweep.statistic}|; † pre-declared primary layer. "
        f"CIs: {round(100 * sweep.confidence)}% bootstrap over personas ({sweep.n_bootstrap} "
        "resamples); "
        f"max-T: permutation p adjusted for the choice among {len(sweep.layers)} layers "
        f"({sweep.n_permutations} permutations)."
    )
    head = f"# Layer sweep\n\n{sweep.summary()}\n\n" if heading else ""
    return head + table + note + "\n"


def _provenance(tool: str, table: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "tool": tool,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arguments": {k: (list(v) if isinstance(v, tuple) else v) for k, v in arguments.items()},
        "package_versions": package_versions(),
    }
    if isinstance(table, str | os.PathLike):
        info["input"] = str(table)
        info["input_sha256"] = hashlib.sha256(Path(table).read_bytes()).hexdigest()
    return info


def write_analysis(
    result: Robustness,
    *,
    json_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
    figure_path: str | os.PathLike[str] | None = None,
    sweep: LayerSweep | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Writes the requested files (JSON in ``SCHEMA``, Markdown, hero figure) and returns their
    paths.

    Raises:
        ImportError, RuntimeError: Before anything is written, when the figure is a static image
            and kaleido (the ``figures`` extra) or its Chromium is missing.
    """
    from persona_geometry.analysis.figures import check_static_export

    if figure_path is not None:
        check_static_export([Path(figure_path).suffix])
    written: dict[str, Path] = {}
    if json_path is not None:
        payload = result.to_dict()
        payload["provenance"] = provenance or _provenance(
            "persona_geometry.analysis.write_analysis", None, {}
        )
        written["json"] = atomic_write_json(json_path, payload)
    if markdown_path is not None:
        written["markdown"] = atomic_write_text(markdown_path, robustness_markdown(result, sweep))
    if figure_path is not None:
        from persona_geometry.analysis.figures import hero_scatter, write_figure

        written["figure"] = write_figure(hero_scatter(result), figure_path)
    for kind, path in written.items():
        log.info("wrote %s %s", kind, path)
    return written


def analyze_table(
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
    json_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
    figure_path: str | os.PathLike[str] | None = None,
) -> Robustness:
    """Returns ``analyze(table, ...)`` after writing the requested JSON/Markdown/figure files.

    See ``persona_geometry.analysis.analyze`` for the arguments; the three paths are optional.
    """
    arguments = dict(
        x=x,
        k=k,
        n=n,
        rate=rate,
        persona=persona,
        category=category,
        covariate=covariate,
        holdout=list(holdout or []),
        reference=reference,
        exclude_reference=exclude_reference,
        seed_column=seed_column,
        layer=layer,
    )
    result = analyze(table, **arguments)
    write_analysis(
        result,
        json_path=json_path,
        markdown_path=markdown_path,
        figure_path=figure_path,
        provenance=_provenance("persona-geometry analyze", table, arguments),
    )
    return result


def read_sweep_table(
    table: pd.DataFrame | str | os.PathLike[str],
    *,
    persona: str = "persona",
    k: str | None = None,
    n: str | None = None,
    rate: str | None = None,
    layout: str = "auto",
    layer: str = "layer",
    cosine: str = "cosine",
    layer_pattern: str = LAYER_COLUMN_PATTERN,
) -> tuple[pd.DataFrame, dict[str, np.ndarray | None]]:
    """Returns ``(wide persona × layer cosines, {"y", "k", "n"} per persona)`` from a sweep table.

    A *long* table has one row per (persona, layer) with columns ``persona``, ``layer``,
    ``cosine`` and the per-persona ``k``/``n`` (or ``rate``) repeated on every row. A *wide*
    table has one row per persona and one column per layer, named as ``layer_pattern`` matches
    (``12``, ``layer_12``, ``L12``, ``cos_12``...). ``layout="auto"`` picks long when the
    ``layer`` and ``cosine`` columns exist.
    """
    func = "sweep"
    frame = read_table(table, func)
    layout = check_one_of(layout, "layout", func, TABLE_LAYOUTS)
    if (k is None) != (n is None) or (rate is None) == (k is None):
        invalid(
            "k",
            func,
            "given with n (raw counts), or rate given instead",
            {"k": k, "n": n, "rate": rate},
        )
    needed = {"persona": persona, "k": k, "n": n, "rate": rate}
    if layout == "auto":
        layout = "long" if layer in frame.columns and cosine in frame.columns else "wide"
    if layout == "long":
        needed.update(layer=layer, cosine=cosine)
    for param, col in needed.items():
        if col is not None and col not in frame.columns:
            invalid(param, func, f"a column of the table {list(map(str, frame.columns))}", col)
    frame = frame.assign(**{persona: frame[persona].astype(str)})
    value_cols = [c for c in (k, n, rate) if c is not None]
    for col in value_cols:
        if pd.to_numeric(frame[col], errors="coerce").isna().any():
            invalid(col, func, "numbers in every row", "missing or non-numeric values")
    if rate is not None:
        check_rates(frame[rate].to_numpy(dtype=np.float64), frame[persona].tolist(), rate, func)

    if layout == "long":
        if frame.duplicated([persona, layer]).any():
            row = frame.loc[frame.duplicated([persona, layer]), [persona, layer]].iloc[0].tolist()
            invalid("table", func, "one row per (persona, layer)", f"{tuple(row)} twice")
        if pd.to_numeric(frame[cosine], errors="coerce").isna().any():
            invalid(cosine, func, "numbers in every row", "missing or non-numeric cosines")
        wide = frame.pivot(index=persona, columns=layer, values=cosine)
        wide = wide.reindex(list(dict.fromkeys(frame[persona])))
        wide.columns = [int(c) for c in wide.columns]
        wide = wide[sorted(wide.columns)]
        if wide.isna().any().any():
            missing = [(p, c) for p in wide.index for c in wide.columns if pd.isna(wide.loc[p, c])]
            invalid("table", func, "a cosine for every (persona, layer)", f"none for {missing[:5]}")
        per = frame.groupby(persona, sort=False)[value_cols].nunique()
        if (per > 1).any().any():
            invalid(
                "table",
                func,
                f"the same {'/'.join(value_cols)} on every layer's row of a persona",
                per[(per > 1).any(axis=1)].index.tolist(),
            )
        per_persona = frame.drop_duplicates(persona).set_index(persona).loc[wide.index]
    else:
        if frame[persona].duplicated().any():
            invalid(
                "table",
                func,
                "one row per persona in a wide table",
                f"{frame.loc[frame[persona].duplicated(), persona].tolist()} more than once",
            )
        try:
            pattern = re.compile(layer_pattern)
        except re.error as e:
            raise ValueError(
                f"The 'layer_pattern' parameter of {func} must be a regular expression with one "
                f"group. Got {layer_pattern!r} ({e}) instead."
            ) from e
        if pattern.groups != 1:
            invalid(
                "layer_pattern",
                func,
                "a regular expression with exactly one group (the layer index)",
                layer_pattern,
            )
        layer_cols = {c: int(m.group(1)) for c in frame.columns if (m := pattern.match(str(c)))}
        if not layer_cols:
            invalid(
                "table",
                func,
                f"layer columns matching {layer_pattern!r} (or a long table with {layer!r} and "
                f"{cosine!r})",
                list(map(str, frame.columns)),
            )
        per_persona = frame.set_index(persona)
        wide = per_persona[list(layer_cols)].apply(pd.to_numeric, errors="coerce")
        wide.columns = list(layer_cols.values())
        if wide.isna().any().any():
            invalid(
                "table",
                func,
                "numeric cosines in every layer column",
                "missing or non-numeric values",
            )
        if len(set(wide.columns)) != len(wide.columns):
            invalid("table", func, "one column per layer", list(layer_cols))
        wide = wide[sorted(wide.columns)]
    values = {
        "y": None if rate is None else per_persona[rate].to_numpy(dtype=np.float64),
        "k": None if k is None else per_persona[k].to_numpy(dtype=np.float64),
        "n": None if n is None else per_persona[n].to_numpy(dtype=np.float64),
    }
    return wide.astype(np.float64), values


def sweep_table(
    table: pd.DataFrame | str | os.PathLike[str],
    *,
    persona: str = "persona",
    k: str | None = None,
    n: str | None = None,
    rate: str | None = None,
    layout: str = "auto",
    layer: str = "layer",
    cosine: str = "cosine",
    layer_pattern: str = LAYER_COLUMN_PATTERN,
    exclude: Sequence[str] | None = None,
    reference: str | None = None,
    primary_layer: int | None = None,
    statistic: str = "spearman",
    n_permutations: int = 10_000,
    n_bootstrap: int = 2_000,
    seed: int = 0,
    csv_path: str | os.PathLike[str] | None = None,
    json_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
    figure_path: str | os.PathLike[str] | None = None,
) -> LayerSweep:
    """Returns the layer sweep of a table (see ``read_sweep_table``) after writing the requested
    files.

    The CSV is ``LayerSweep.to_frame()`` (one row per layer); the JSON is ``LayerSweep.to_dict()``
    plus ``provenance``; the figure is the sweep curve.
    """
    from persona_geometry.analysis.figures import check_static_export

    if figure_path is not None:
        check_static_export([Path(figure_path).suffix])
    wide, values = read_sweep_table(
        table,
        persona=persona,
        k=k,
        n=n,
        rate=rate,
        layout=layout,
        layer=layer,
        cosine=cosine,
        layer_pattern=layer_pattern,
    )
    result = layer_sweep(
        wide.to_numpy(),
        values["y"],
        k=values["k"],
        n=values["n"],
        personas=list(wide.index),
        layers=list(wide.columns),
        exclude=exclude,
        reference=reference,
        primary_layer=primary_layer,
        statistic=statistic,
        n_permutations=n_permutations,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    arguments = dict(
        persona=persona,
        k=k,
        n=n,
        rate=rate,
        layout=layout,
        layer=layer,
        cosine=cosine,
        layer_pattern=layer_pattern,
        exclude=list(exclude or []),
        reference=reference,
        primary_layer=primary_layer,
        statistic=statistic,
        n_permutations=n_permutations,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    if csv_path is not None:
        from persona_geometry._io import atomic_path

        with atomic_path(csv_path) as tmp:
            result.to_frame().to_csv(tmp, index=False)
    if json_path is not None:
        atomic_write_json(
            json_path,
            {
                **result.to_dict(),
                "provenance": _provenance("persona-geometry sweep", table, arguments),
            },
        )
    if markdown_path is not None:
        atomic_write_text(markdown_path, sweep_markdown(result))
    if figure_path is not None:
        from persona_geometry.analysis.figures import sweep_curve, write_figure

        write_figure(sweep_curve(result), figure_path)
    for kind, path in (
        ("csv", csv_path),
        ("json", json_path),
        ("markdown", markdown_path),
        ("figure", figure_path),
    ):
        if path is not None:
            log.info("wrote %s %s", kind, path)
    return result
