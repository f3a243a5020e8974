"""Figures with plotly: the hero scatter, the layer-sweep curve and the pairwise cosine heatmap.

Every function returns a ``plotly.graph_objects.Figure`` sized for a static export (so a PNG keeps
its labels); ``write_figure`` saves it. HTML files load plotly.js from one ``plotly.min.js``
written next to them (one copy per folder, offline), or inline it, or take it from a CDN.
PNG/PDF/SVG go through kaleido, which needs the ``figures`` extra and a Chromium on the machine:
``check_static_export`` says so in one line before anything is written.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from persona_geometry._io import atomic_path, atomic_write_text
from persona_geometry._validation import check_one_of, invalid
from persona_geometry.analysis.robustness import Robustness, ols, prediction_intervals
from persona_geometry.analysis.sweep import LayerSweep
from persona_geometry.geometry import PairwiseCosine
from persona_geometry.settings import PLOTLYJS_MODES, STATIC_FORMATS

__all__ = [
    "check_static_export",
    "cosine_heatmap",
    "cosine_heatmap_grid",
    "default_grid_layers",
    "hero_scatter",
    "sweep_curve",
    "write_figure",
    "write_figures",
]

log = logging.getLogger(__name__)

_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_PLOTLYJS_FILE = "plotly.min.js"
# Pixel size every figure is laid out for; static exports use it unless told otherwise.
_WIDTH, _HEIGHT = 960, 640
_FONT = {"family": "Arial, Helvetica, sans-serif", "size": 14}


# --- the scatter ------------------------------------------------------------------------------
_LABEL_POSITIONS = (
    "top center",
    "bottom center",
    "middle right",
    "middle left",
    "top right",
    "bottom left",
    "top left",
    "bottom right",
)


def _label_positions(
    px: np.ndarray,
    py: np.ndarray,
    labels: Sequence[str],
    size: tuple[int | float, int | float],
    char_px: float = 7.5,
    line_px: float = 16.0,
) -> list[str | None]:
    """Returns a text position per point such that label boxes do not overlap (None: hover only).

    Greedy in pixel space (``size`` is the plot area), points taken left to right; each label
    tries the positions in order and takes the first whose box stays inside the plot area and
    meets no placed box and no other point.
    """
    px, py = np.asarray(px, dtype=np.float64).tolist(), np.asarray(py, dtype=np.float64).tolist()
    placed: list[tuple[float, float, float, float]] = []
    points = [(x - 6, y - 6, x + 6, y + 6) for x, y in zip(px, py, strict=True)]
    out: list[str | None] = [None] * len(labels)

    def box(i: int, pos: str) -> tuple[float, float, float, float]:
        w, h = char_px * len(labels[i]) + 4, line_px
        x, y = px[i], py[i]
        vert, horiz = pos.split()
        cy = {"top": y - 8 - h / 2, "bottom": y + 8 + h / 2, "middle": y}[vert]
        cx = {"center": x, "right": x + 8 + w / 2, "left": x - 8 - w / 2}[horiz]
        if vert != "middle" and horiz != "center":  # diagonal: the box's corner sits at the point
            cx = x + (w / 2 if horiz == "right" else -w / 2)
        return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)

    def overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for i in np.argsort(px, kind="stable").tolist():
        for pos in _LABEL_POSITIONS:
            b = box(i, pos)
            others = [p for j, p in enumerate(points) if j != i]
            inside = b[0] >= 0 and b[1] >= 0 and b[2] <= size[0] and b[3] <= size[1]
            if (
                inside
                and not any(overlaps(b, q) for q in placed)
                and not any(overlaps(b, q) for q in others)
            ):
                placed.append(b)
                out[i] = pos
                break
    return out


def _x_title(result: Robustness, reference: str | None) -> str:
    where = f", layer {result.layer}" if result.layer is not None else ""
    ref = reference or result.reference
    if result.x_name == "cosine" and ref:
        return f"centered cosine to {ref}{where}"
    return f"{result.x_name}{where}"


def hero_scatter(
    result: Robustness,
    *,
    title: str | None = None,
    reference: str | None = None,
    x_title: str | None = None,
    labels: str = "auto",
) -> go.Figure:
    """Returns rate vs x per persona with Wilson 95% bars, the OLS line and its prediction band.

    Categories are coloured; the reference persona is a diamond; held-out personas are stars
    with their prediction-interval whiskers, and the line and band come from the fit without
    them. The band, the line and every bar are clipped to [0, 1], the range of a rate. The
    title always carries r, ρ and n (``title`` is put before them).

    Args:
        result: A ``Robustness`` from ``robustness_at_layer``/``analyze``.
        title: Words before the statistics; default "Source rate vs <x>".
        reference: The reference persona to mark; default ``result.reference``.
        x_title: The x-axis title; default "centered cosine to <reference>, layer L".
        labels: ``auto`` (names placed so they do not overprint; the rest on hover),
            ``all`` or ``none`` (hover only).
    """
    check_one_of(labels, "labels", "hero_scatter", ("auto", "all", "none"))
    reference = reference or result.reference
    held = {h.persona: h for h in result.holdout}
    fitted = [i for i, p in enumerate(result.personas) if p not in held]
    x_fit, y_fit = result.x[fitted], result.rate[fitted]
    pad = 0.04 * (result.x.max() - result.x.min() or 1.0)
    grid = np.linspace(result.x.min() - pad, result.x.max() + pad, 120)
    band = prediction_intervals(ols(x_fit, y_fit), grid, result.alpha)
    level = round(100 * (1 - result.alpha))
    upper = np.clip(band["obs_ci_upper"].to_numpy(), 0.0, 1.0)
    lower = np.clip(band["obs_ci_lower"].to_numpy(), 0.0, 1.0)
    mean = band["mean"].to_numpy()
    # The fitted line is drawn only where it predicts a possible rate.
    line = np.where((mean >= 0) & (mean <= 1), mean, np.nan)

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=np.concatenate([grid, grid[::-1]]),
            y=np.concatenate([upper, lower[::-1]]),
            mode="lines",
            fill="toself",
            fillcolor="rgba(120,120,120,0.18)",
            line={"width": 0},
            hoverinfo="skip",
            name=f"{level}% prediction interval",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=grid,
            y=line,
            mode="lines",
            line={"color": "#444", "dash": "dash"},
            name=f"OLS fit (n = {result.fit.n})",
            hoverinfo="skip",
        )
    )

    # Label placement in the pixel space the figure is laid out in.
    x_lo, x_hi = float(grid[0]), float(grid[-1])
    plot_w, plot_h = _WIDTH - 80 - 220, _HEIGHT - 90 - 80
    px = (result.x - x_lo) / (x_hi - x_lo or 1.0) * plot_w
    py = (1.05 - result.rate) / 1.1 * plot_h
    if labels == "auto":
        positions = _label_positions(px, py, result.personas, (plot_w, plot_h))
    else:
        positions = ["top center" if labels == "all" else None] * result.n_personas

    categories = list(dict.fromkeys(result.categories))
    have_counts = bool(result.wilson)
    for c_i, cat in enumerate(categories):
        color = _PALETTE[c_i % len(_PALETTE)]
        in_cat = [i for i in range(result.n_personas) if result.categories[i] == cat]
        roles = (
            (
                "fitted",
                [
                    i
                    for i in in_cat
                    if result.personas[i] not in held and result.personas[i] != reference
                ],
            ),
            ("held out", [i for i in in_cat if result.personas[i] in held]),
            (
                "reference",
                [
                    i
                    for i in in_cat
                    if result.personas[i] == reference and result.personas[i] not in held
                ],
            ),
        )
        for role, members in roles:
            if not members:
                continue
            star = role == "held out"
            error = None
            if have_counts:
                lo = np.array([result.wilson[result.personas[i]][0] for i in members])
                hi = np.array([result.wilson[result.personas[i]][1] for i in members])
                rate = result.rate[members]
                error = {
                    "type": "data",
                    "symmetric": False,
                    "array": np.clip(hi, 0, 1) - rate,
                    "arrayminus": rate - np.clip(lo, 0, 1),
                    "color": color,
                    "thickness": 1.2,
                    "width": 3,
                }
            symbols = "star" if star else ("diamond" if role == "reference" else "circle")
            fig.add_trace(
                go.Scatter(
                    x=result.x[members],
                    y=result.rate[members],
                    mode="markers+text",
                    text=[result.personas[i] if positions[i] else "" for i in members],
                    textposition=[positions[i] or "top center" for i in members],
                    textfont={"size": 12},
                    customdata=[
                        [
                            result.personas[i],
                            "" if result.k is None else f"{int(result.k[i])}/{int(result.n[i])}",
                        ]
                        for i in members
                    ],
                    marker={
                        "color": color,
                        "size": 18 if star else (14 if role == "reference" else 12),
                        "symbol": symbols,
                        "line": {"width": 1, "color": "#222"},
                    },
                    error_y=error,
                    name=f"reference: {reference} ({cat})"
                    if role == "reference"
                    else (f"{cat} ({role})" if held else cat),
                    hovertemplate="%{customdata[0]}<br>x = %{x:.3f}<br>"
                    "rate = %{y:.3f} (%{customdata[1]})<extra></extra>",
                )
            )
    if held:
        # Prediction-interval whiskers of held-out personas, drawn beside their Wilson bars.
        xs, ys = [], []
        for h in result.holdout:
            i = result.personas.index(h.persona)
            xx = float(result.x[i]) + 0.012 * (x_hi - x_lo)
            xs += [xx, xx, None]
            ys += [max(0.0, h.pi_lower), min(1.0, h.pi_upper), None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"color": "#444", "width": 3},
                name=f"held out: {level}% PI from the fit without them",
                hoverinfo="skip",
            )
        )
    c = result.correlation
    stats = f"r = {c.pearson_r:+.2f}, ρ = {c.spearman_rho:+.2f}, n = {c.n}"
    head = title or f"Source rate vs {_x_title(result, reference)}"
    fig.update_layout(
        title={"text": f"{head}<br><sup>{stats}</sup>"},
        xaxis={
            "title": {"text": x_title or _x_title(result, reference)},
            "range": [x_lo, x_hi],
            "zeroline": False,
        },
        yaxis={
            "title": {"text": "source rate (Wilson 95% CI)" if have_counts else "source rate"},
            "range": [-0.05, 1.05],
        },
        template="plotly_white",
        width=_WIDTH,
        height=_HEIGHT,
        font=_FONT,
        legend={"x": 1.02, "y": 1, "xanchor": "left"},
        margin={"l": 80, "r": 220, "t": 90, "b": 80},
    )
    return fig


# --- the sweep --------------------------------------------------------------------------------
def sweep_curve(sweep: LayerSweep, *, alpha: float = 0.05, title: str | None = None) -> go.Figure:
    """Returns Pearson r and Spearman ρ per layer with bootstrap CI bands.

    Layers whose Holm-corrected p-value is below ``alpha`` get filled markers (open otherwise);
    the strongest layer and the pre-declared primary layer are marked with vertical lines. Layer
    ticks are whole numbers.
    """
    layers = np.array(sweep.layers)
    fig = go.Figure()
    series = (
        (
            "Pearson r",
            sweep.pearson_r,
            sweep.pearson_ci,
            sweep.pearson_p_holm,
            "#1f77b4",
            "rgba(31,119,180,0.15)",
        ),
        (
            "Spearman ρ",
            sweep.spearman_rho,
            sweep.spearman_ci,
            sweep.spearman_p_holm,
            "#d62728",
            "rgba(214,39,40,0.15)",
        ),
    )
    for name, values, ci, p_holm, color, fill in series:
        if np.isfinite(ci).all():
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([layers, layers[::-1]]),
                    y=np.concatenate([ci[:, 1], ci[::-1, 0]]),
                    mode="lines",
                    fill="toself",
                    fillcolor=fill,
                    line={"width": 0},
                    hoverinfo="skip",
                    name=f"{name} {round(100 * sweep.confidence)}% bootstrap CI",
                )
            )
        significant = p_holm < alpha
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=values,
                mode="lines+markers",
                line={"color": color},
                marker={
                    "color": [color if s else "white" for s in significant],
                    "line": {"color": color, "width": 2},
                    "size": 9,
                    "symbol": "circle",
                },
                name=f"{name} (filled: Holm p < {alpha})",
                customdata=np.column_stack([p_holm]),
                hovertemplate="layer %{x}<br>%{y:.3f}<br>"
                "Holm p = %{customdata[0]:.3g}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line={"color": "#999", "width": 1})
    fig.add_vline(
        x=sweep.best_layer,
        line={"color": "#555", "dash": "dot"},
        annotation_text=f"strongest: {sweep.best_layer}",
    )
    if sweep.primary_layer is not None:
        fig.add_vline(
            x=sweep.primary_layer,
            line={"color": "#2ca02c", "width": 2},
            annotation_text=f"primary: {sweep.primary_layer}",
            annotation_position="bottom right",
        )
    p_text = f"; max-over-layers p = {sweep.max_statistic_p:.3g}" if sweep.n_permutations else ""
    step = max(1, math.ceil((int(layers.max()) - int(layers.min()) + 1) / 16))
    fig.update_layout(
        title={"text": title or f"Layer sweep over {sweep.n_personas} personas{p_text}"},
        xaxis={
            "title": {"text": "layer (block output)"},
            "tickmode": "linear",
            "tick0": int(layers.min()),
            "dtick": step,
        },
        yaxis={"title": {"text": "correlation with source rate"}, "range": [-1.05, 1.05]},
        template="plotly_white",
        width=_WIDTH,
        height=_HEIGHT * 3 // 4,
        font=_FONT,
    )
    return fig


# --- the heatmaps -----------------------------------------------------------------------------
def _pairwise_arrays(
    pairwise: PairwiseCosine | np.ndarray,
    personas: Sequence[str] | None,
    layers: Sequence[int] | None,
    func: str,
) -> tuple[np.ndarray, list[str], list[int], bool]:
    if isinstance(pairwise, PairwiseCosine):
        values = pairwise.values.detach().cpu().double().numpy()
        personas = list(pairwise.personas) if personas is None else list(personas)
        layers = list(pairwise.layers) if layers is None else list(layers)
        centered = pairwise.centered_on is not None
    else:
        values = np.asarray(pairwise, dtype=np.float64)
        if values.ndim != 3 or values.shape[1] != values.shape[2]:
            invalid("pairwise", func, "shaped [layer, persona, persona]", values.shape)
        personas = (
            [f"persona_{i}" for i in range(values.shape[1])] if personas is None else list(personas)
        )
        layers = list(range(values.shape[0])) if layers is None else list(layers)
        centered = True
    if len(personas) != values.shape[1] or len(layers) != values.shape[0]:
        invalid(
            "personas",
            func,
            f"{values.shape[1]} names and {values.shape[0]} layers, as the values",
            (len(personas), len(layers)),
        )
    return values, personas, layers, centered


def _mask_diagonal(m: np.ndarray) -> np.ndarray:
    m = m.copy()
    np.fill_diagonal(m, np.nan)
    return m


def _off_diagonal_limit(values: np.ndarray) -> float:
    """Returns the largest |cosine| off the diagonal (the colour scale's half-range)."""
    off = ~np.eye(values.shape[-1], dtype=bool)
    lim = float(np.nanmax(np.abs(values[..., off]))) if values.shape[-1] > 1 else 1.0
    return lim if np.isfinite(lim) and lim > 0 else 1.0


def cosine_heatmap(
    pairwise: PairwiseCosine | np.ndarray,
    *,
    personas: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Returns the persona × persona cosine heatmap with a slider over layers.

    The diagonal (1 by construction) is left blank and each layer's colour scale spans its own
    off-diagonal range, symmetric around 0, so structure between personas shows. The title and
    the colour bar change with the slider.
    """
    values, personas, layers, centered = _pairwise_arrays(
        pairwise, personas, layers, "cosine_heatmap"
    )
    what = "centered cosine" if centered else "cosine"
    title = title or f"Pairwise {what} of persona centroids"
    longest = max(len(p) for p in personas)
    label_px = int(7.5 * longest * math.sin(math.radians(45))) + 30  # rotated x labels' height
    height = 720 + label_px
    margin = {"l": 40 + int(7.5 * longest), "r": 40, "t": 80, "b": label_px + 110}
    fig = go.Figure()
    for k, layer in enumerate(layers):
        lim = _off_diagonal_limit(values[k])
        fig.add_trace(
            go.Heatmap(
                z=_mask_diagonal(values[k]),
                x=personas,
                y=personas,
                zmin=-lim,
                zmax=lim,
                colorscale="RdBu",
                reversescale=True,
                colorbar={"title": {"text": what, "side": "right"}},
                visible=k == 0,
                name=f"layer {layer}",
                hoverongaps=False,
                hovertemplate="%{y} · %{x}<br>" + what + " = %{z:.3f}<extra></extra>",
            )
        )
    steps = [
        {
            "method": "update",
            "label": str(layer),
            # plotly.js reads a layout title only from title.text; {"title": str} is ignored.
            "args": [
                {"visible": [j == k for j in range(len(layers))]},
                {"title.text": f"{title}, layer {layer}"},
            ],
        }
        for k, layer in enumerate(layers)
    ]
    plot_h = height - margin["t"] - margin["b"]
    fig.update_layout(
        title={"text": f"{title}, layer {layers[0]}"},
        sliders=[
            {
                "active": 0,
                "currentvalue": {"prefix": "layer "},
                "steps": steps,
                # Below the rotated persona names, not over them.
                "y": -(label_px + 10) / plot_h,
                "yanchor": "top",
                "pad": {"t": 10, "b": 10},
            }
        ],
        xaxis={"tickangle": -45, "constrain": "domain"},
        yaxis={"autorange": "reversed", "scaleanchor": "x", "constrain": "domain"},
        template="plotly_white",
        width=max(_WIDTH, 500 + margin["l"]),
        height=height,
        margin=margin,
        font=_FONT,
    )
    return fig


def default_grid_layers(
    layers: Sequence[int], primary: int | None = None, count: int = 6
) -> list[int]:
    """Returns up to ``count`` evenly spaced layers of ``layers``, always with ``primary``."""
    layers = list(layers)
    if len(layers) <= count:
        return layers
    picked = {layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)}
    if primary is not None and primary in layers and primary not in picked:
        picked.discard(
            min(picked - {layers[0], layers[-1]}, key=lambda v: abs(v - primary), default=layers[1])
        )
        picked.add(primary)
    return sorted(picked)


def cosine_heatmap_grid(
    pairwise: PairwiseCosine | np.ndarray,
    layers: Sequence[int] | None = None,
    *,
    personas: Sequence[str] | None = None,
    columns: int = 3,
    title: str | None = None,
) -> go.Figure:
    """Returns small multiples of the cosine heatmap, one panel per chosen layer, for a PDF.

    The panels share one colour scale, symmetric around 0 and spanning the off-diagonal values of
    the chosen layers; the diagonal is blank.

    Args:
        pairwise: The pairwise cosines ``[layer, persona, persona]``.
        layers: Layers to draw (values of ``pairwise.layers``); default up to six evenly spaced.
        personas: Names when ``pairwise`` is an array.
        columns: Panels per row.
        title: The figure's title.
    """
    from plotly.subplots import make_subplots

    values, names, all_layers, centered = _pairwise_arrays(
        pairwise, personas, None, "cosine_heatmap_grid"
    )
    chosen = default_grid_layers(all_layers) if layers is None else list(layers)
    for layer in chosen:
        if layer not in all_layers:
            invalid("layers", "cosine_heatmap_grid", f"layers among {all_layers}", layer)
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        invalid("columns", "cosine_heatmap_grid", "a positive int", columns)
    idx = [all_layers.index(layer) for layer in chosen]
    columns = min(columns, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    what = "centered cosine" if centered else "cosine"
    lim = _off_diagonal_limit(values[idx])
    fig = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=[f"layer {layer}" for layer in chosen],
        horizontal_spacing=0.03,
        vertical_spacing=0.06,
    )
    for j, k in enumerate(idx):
        fig.add_trace(
            go.Heatmap(
                z=_mask_diagonal(values[k]),
                x=names,
                y=names,
                coloraxis="coloraxis",
                hoverongaps=False,
                name=f"layer {chosen[j]}",
                hovertemplate="%{y} · %{x}<br>" + what + " = %{z:.3f}<extra></extra>",
            ),
            row=j // columns + 1,
            col=j % columns + 1,
        )
    longest = max(len(p) for p in names)
    panel = 300 if len(names) <= 16 else 420
    fig.update_xaxes(tickangle=-45, tickfont={"size": 9}, showticklabels=False)
    fig.update_yaxes(autorange="reversed", tickfont={"size": 9}, showticklabels=False)
    for c in range(1, columns + 1):  # names on the bottom row and the left column only
        fig.update_xaxes(showticklabels=True, row=rows, col=c)
    for r in range(1, rows + 1):
        fig.update_yaxes(showticklabels=True, row=r, col=1)
    fig.update_layout(
        title={"text": title or f"Pairwise {what} of persona centroids"},
        coloraxis={
            "colorscale": "RdBu",
            "reversescale": True,
            "cmin": -lim,
            "cmax": lim,
            "colorbar": {"title": {"text": what}},
        },
        template="plotly_white",
        width=columns * panel + 6 * longest + 160,
        height=rows * panel + 6 * longest + 120,
        margin={"l": 6 * longest + 20, "b": 6 * longest + 20, "t": 80, "r": 120},
        font={**_FONT, "size": 12},
    )
    return fig


# --- writing ----------------------------------------------------------------------------------
_static_ok: bool = False


def check_static_export(formats: Sequence[str] = ("png",)) -> None:
    """Returns None when kaleido and a Chromium can write ``formats``; raises otherwise, in one
    line.

    Call it before writing anything, so a missing extra fails a run before it has written half
    its files. HTML needs neither; the check renders one blank image once per process.

    Raises:
        ImportError: When kaleido (the ``figures`` extra) is not installed.
        RuntimeError: When kaleido cannot find or start a Chromium.
    """
    global _static_ok
    static = [f for f in (s.lower().lstrip(".") for s in formats) if f in STATIC_FORMATS]
    if not static or _static_ok:
        return
    try:
        import kaleido  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"Static figures ({', '.join(static)}) need kaleido: pip install "
            "'persona-geometry[figures]', and a Chromium "
            "(Debian: apt install chromium). Write .html figures instead to need neither."
        ) from e
    try:
        go.Figure().to_image(format="png", width=32, height=32)
    except Exception as e:  # kaleido reports a missing browser with several exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"kaleido (the 'figures' extra) could not start a Chromium ({first}): on Debian apt "
            "install chromium, "
            "or run `plotly_get_chrome`. Write .html figures instead to need neither."
        ) from e
    _static_ok = True


def _write_plotlyjs(folder: Path) -> Path:
    """Writes ``plotly.min.js`` into ``folder`` unless the same bundle is already there."""
    from plotly.offline import get_plotlyjs

    path = folder / _PLOTLYJS_FILE
    text = get_plotlyjs()
    if (
        not path.is_file()
        or path.stat().st_size != len(text.encode())
        or path.read_text(encoding="utf-8") != text
    ):
        atomic_write_text(path, text)
    return path


def write_figure(
    fig: go.Figure,
    path: str | os.PathLike[str],
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float | int = 1.0,
    plotlyjs: str = "directory",
) -> Path:
    """Writes ``fig`` atomically: ``.html`` (offline) or an image via kaleido, and returns its path.

    Args:
        fig: The figure.
        path: The file; its suffix picks the format (``.html``, ``.png``, ``.pdf``, ``.svg``...).
        width: Image width in pixels; default the figure's own.
        height: Image height in pixels; default the figure's own.
        scale: Pixel multiplier for raster images.
        plotlyjs: For HTML: ``directory`` loads a ``plotly.min.js`` written next to the file
            (one copy per folder, offline), ``inline`` embeds it, ``cdn`` loads it from the web.

    Raises:
        ValueError: On an unknown file suffix or ``plotlyjs`` mode.
        ImportError: For an image format when kaleido (the ``figures`` extra) is missing.
        RuntimeError: When kaleido cannot find or start a Chromium.
    """
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    check_one_of(plotlyjs, "plotlyjs", "write_figure", PLOTLYJS_MODES)
    if suffix in ("html", "htm"):
        include: bool | str = {"directory": _PLOTLYJS_FILE, "inline": True, "cdn": "cdn"}[plotlyjs]
        if plotlyjs == "directory":
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_plotlyjs(path.parent)
        log.info("writing figure %s", path)
        return atomic_write_text(path, fig.to_html(include_plotlyjs=include, full_html=True))
    if suffix not in STATIC_FORMATS:
        invalid(
            "path",
            "write_figure",
            f"a file ending in .html or one of {['.' + s for s in STATIC_FORMATS]}",
            str(path),
        )
    check_static_export([suffix])
    w = width or fig.layout.width or _WIDTH
    h = height or fig.layout.height or _HEIGHT
    try:
        image = fig.to_image(
            format="jpeg" if suffix == "jpg" else suffix, width=w, height=h, scale=scale
        )
    except Exception as e:
        raise RuntimeError(
            f"kaleido could not render {path.name} ({type(e).__name__}: {e})."
        ) from e
    with atomic_path(path) as tmp:
        tmp.write_bytes(image)
    log.info("wrote figure %s", path)
    return path


def write_figures(
    figures: dict[str, go.Figure],
    folder: str | os.PathLike[str],
    *,
    formats: Sequence[str] = ("html",),
    width: int | None = None,
    height: int | None = None,
    scale: float | int = 1.0,
    plotlyjs: str = "directory",
) -> dict[str, Path]:
    """Writes every figure in every format into ``folder``; returns ``{name.fmt: path}``.

    The other arguments mean what they mean in ``write_figure``.

    Raises:
        ImportError, RuntimeError: Before writing anything, when a static format cannot be made.
    """
    static = [f for f in formats if f.lower() in STATIC_FORMATS]
    check_static_export(static)
    folder = Path(folder)
    written: dict[str, Path] = {}
    with _kaleido_server(bool(static)):
        for name, fig in figures.items():
            for fmt in formats:
                written[f"{name}.{fmt}"] = write_figure(
                    fig,
                    folder / f"{name}.{fmt}",
                    width=width,
                    height=height,
                    scale=scale,
                    plotlyjs=plotlyjs,
                )
    return written


@contextmanager
def _kaleido_server(needed: bool) -> Iterator[None]:
    """Keeps one Chromium open for a batch of images (about 6 s each otherwise, 0.5 s with it)."""
    if not needed:
        yield
        return
    import kaleido

    kaleido.start_sync_server(silence_warnings=True)
    try:
        with warnings.catch_warnings():
            # plotly passes its own kaleido options on every call; the shared server ignores them.
            warnings.filterwarnings(
                "ignore", message="The kopts argument is ignored", category=UserWarning
            )
            yield
    finally:
        kaleido.stop_sync_server(silence_warnings=True)
