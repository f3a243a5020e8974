"""Figures with plotly: the hero scatter, the layer-sweep curve and the pairwise cosine heatmap.

Every function returns a ``plotly.graph_objects.Figure``; ``write_figure`` saves it. HTML files
embed plotly.js (``include_plotlyjs=True``) so they open offline; PNG/PDF/SVG go through kaleido,
which needs the ``figures`` extra and a Chromium on the machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from persona_geometry._io import atomic_path, atomic_write_text
from persona_geometry._validation import invalid
from persona_geometry.analysis.robustness import Robustness, ols, prediction_intervals
from persona_geometry.analysis.sweep import LayerSweep
from persona_geometry.geometry import PairwiseCosine

__all__ = ["cosine_heatmap", "hero_scatter", "sweep_curve", "write_figure"]

log = logging.getLogger(__name__)

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_STATIC_FORMATS = ("png", "pdf", "svg", "jpeg", "jpg", "webp")


def hero_scatter(result: Robustness, *, title: str | None = None) -> go.Figure:
    """Returns rate vs cosine per persona: categories coloured, labelled, OLS line with its 95% PI band.

    Held-out personas are drawn as stars with their prediction-interval whiskers; the line and
    band come from the fit without them.
    """
    held = {h.persona: h for h in result.holdout}
    fitted = [i for i, p in enumerate(result.personas) if p not in held]
    x_fit, y_fit = result.x[fitted], result.rate[fitted]
    grid = np.linspace(result.x.min(), result.x.max(), 100)
    band = prediction_intervals(ols(x_fit, y_fit), grid, result.alpha)
    level = round(100 * (1 - result.alpha))

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=np.concatenate([grid, grid[::-1]]),
            y=np.concatenate([band["obs_ci_upper"].to_numpy(), band["obs_ci_lower"].to_numpy()[::-1]]),
            fill="toself",
            fillcolor="rgba(120,120,120,0.18)",
            line={"width": 0},
            hoverinfo="skip",
            name=f"{level}% prediction interval",
        )
    )
    fig.add_trace(
        go.Scatter(x=grid, y=band["mean"].to_numpy(), mode="lines", line={"color": "#444", "dash": "dash"}, name=f"OLS fit (n={result.fit.n})")
    )
    categories = list(dict.fromkeys(result.categories))
    for c_i, cat in enumerate(categories):
        color = _PALETTE[c_i % len(_PALETTE)]
        for role, members in (
            ("fitted", [i for i in range(result.n_personas) if result.categories[i] == cat and result.personas[i] not in held]),
            ("held out", [i for i in range(result.n_personas) if result.categories[i] == cat and result.personas[i] in held]),
        ):
            if not members:
                continue
            star = role == "held out"
            error = None
            if star:
                hs = [held[result.personas[i]] for i in members]
                error = {
                    "type": "data",
                    "symmetric": False,
                    "array": [h.pi_upper - h.observed for h in hs],
                    "arrayminus": [h.observed - h.pi_lower for h in hs],
                    "color": color,
                    "thickness": 1,
                }
            fig.add_trace(
                go.Scatter(
                    x=result.x[members],
                    y=result.rate[members],
                    mode="markers+text",
                    text=[result.personas[i] for i in members],
                    textposition="top center",
                    marker={"color": color, "size": 16 if star else 10, "symbol": "star" if star else "circle", "line": {"width": 1, "color": "#222"}},
                    error_y=error,
                    name=f"{cat} ({role})" if held else cat,
                    hovertemplate="%{text}<br>x=%{x:.3f}<br>rate=%{y:.3f}<extra></extra>",
                )
            )
    c = result.correlation
    where = f", layer {result.layer}" if result.layer is not None else ""
    fig.update_layout(
        title=title or f"Source rate vs {result.x_name}{where}: r = {c.pearson_r:+.2f}, ρ = {c.spearman_rho:+.2f} (n = {c.n})",
        xaxis_title=result.x_name,
        yaxis_title="source rate",
        template="plotly_white",
    )
    return fig


def sweep_curve(sweep: LayerSweep, *, alpha: float = 0.05, title: str | None = None) -> go.Figure:
    """Returns Pearson r and Spearman ρ per layer with bootstrap CI bands.

    Layers whose Holm-corrected p-value is below ``alpha`` get filled markers (open otherwise);
    the strongest layer and the pre-declared primary layer are marked with vertical lines.
    """
    layers = np.array(sweep.layers)
    fig = go.Figure()
    series = (
        ("Pearson r", sweep.pearson_r, sweep.pearson_ci, sweep.pearson_p_holm, "#1f77b4", "rgba(31,119,180,0.15)"),
        ("Spearman ρ", sweep.spearman_rho, sweep.spearman_ci, sweep.spearman_p_holm, "#d62728", "rgba(214,39,40,0.15)"),
    )
    for name, values, ci, p_holm, color, fill in series:
        if np.isfinite(ci).all():
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([layers, layers[::-1]]),
                    y=np.concatenate([ci[:, 1], ci[::-1, 0]]),
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
                hovertemplate="layer %{x}<br>%{y:.3f}<br>Holm p=%{customdata[0]:.3g}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line={"color": "#999", "width": 1})
    fig.add_vline(x=sweep.best_layer, line={"color": "#555", "dash": "dot"}, annotation_text=f"strongest: {sweep.best_layer}")
    if sweep.primary_layer is not None:
        fig.add_vline(x=sweep.primary_layer, line={"color": "#2ca02c", "width": 2}, annotation_text=f"primary: {sweep.primary_layer}", annotation_position="bottom right")
    p_text = f"; max-over-layers p = {sweep.max_statistic_p:.3g}" if sweep.n_permutations else ""
    fig.update_layout(
        title=title or f"Layer sweep over {sweep.n_personas} personas{p_text}",
        xaxis_title="layer",
        yaxis_title="correlation with source rate",
        yaxis_range=[-1.05, 1.05],
        template="plotly_white",
    )
    return fig


def cosine_heatmap(
    pairwise: PairwiseCosine | np.ndarray,
    *,
    personas: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    title: str = "Pairwise cosine",
) -> go.Figure:
    """Returns the persona × persona cosine heatmap with a slider over layers."""
    if isinstance(pairwise, PairwiseCosine):
        values = pairwise.values.detach().cpu().double().numpy()
        personas = list(pairwise.personas) if personas is None else personas
        layers = list(pairwise.layers) if layers is None else layers
    else:
        values = np.asarray(pairwise, dtype=np.float64)
        if values.ndim != 3 or values.shape[1] != values.shape[2]:
            invalid("pairwise", "cosine_heatmap", "shaped [layer, persona, persona]", values.shape)
        personas = [f"persona_{i}" for i in range(values.shape[1])] if personas is None else personas
        layers = list(range(values.shape[0])) if layers is None else layers
    fig = go.Figure()
    for k, layer in enumerate(layers):
        fig.add_trace(
            go.Heatmap(
                z=values[k],
                x=list(personas),
                y=list(personas),
                zmin=-1,
                zmax=1,
                colorscale="RdBu",
                reversescale=True,
                visible=k == 0,
                name=f"layer {layer}",
                hovertemplate="%{y} · %{x}<br>cos=%{z:.3f}<extra></extra>",
            )
        )
    steps = [
        {
            "method": "update",
            "label": str(layer),
            "args": [{"visible": [j == k for j in range(len(layers))]}, {"title": f"{title}, layer {layer}"}],
        }
        for k, layer in enumerate(layers)
    ]
    fig.update_layout(
        title=f"{title}, layer {layers[0]}",
        sliders=[{"active": 0, "currentvalue": {"prefix": "layer "}, "steps": steps}],
        yaxis={"autorange": "reversed"},
        template="plotly_white",
    )
    return fig


def write_figure(fig: go.Figure, path: str | os.PathLike[str]) -> Path:
    """Writes ``fig`` atomically: ``.html`` self-contained (offline), else an image via kaleido.

    Raises:
        ValueError: On an unknown file suffix.
        ImportError: For an image format when kaleido (the ``figures`` extra) is missing.
        RuntimeError: When kaleido cannot find or start a Chromium.
    """
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("html", "htm"):
        log.info("writing self-contained figure %s", path)
        return atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    if suffix not in _STATIC_FORMATS:
        invalid("path", "write_figure", f"a file ending in .html or one of {['.' + s for s in _STATIC_FORMATS]}", str(path))
    try:
        import kaleido  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"Writing {path.name} needs kaleido: pip install 'persona-geometry[figures]', and a Chromium "
            "(Debian: apt install chromium). Write a .html figure instead to need neither."
        ) from e
    try:
        image = fig.to_image(format="jpeg" if suffix == "jpg" else suffix)
    except Exception as e:  # kaleido reports a missing browser with several exception types
        raise RuntimeError(
            f"kaleido could not render {path.name} ({type(e).__name__}: {e}). It needs a Chromium: on Debian "
            "apt install chromium, or run `plotly_get_chrome`. A .html figure works without it."
        ) from e
    with atomic_path(path) as tmp:
        tmp.write_bytes(image)
    return path
