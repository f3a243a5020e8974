"""Markdown/JSON reports and plotly figures: content, offline HTML, atomic writes, export errors."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from scipy import stats

from persona_geometry import layer_sweep
from persona_geometry.analysis import (
    cosine_heatmap,
    cosine_heatmap_grid,
    hero_scatter,
    robustness_at_layer,
    robustness_markdown,
    sweep_curve,
    sweep_markdown,
    write_analysis,
    write_figure,
)
from persona_geometry.geometry import PairwiseCosine


def _result():
    rng = np.random.default_rng(0)
    names = [f"p{i}" for i in range(10)]
    x = rng.uniform(-0.5, 1, 10)
    n = np.full(10, 50)
    k = np.clip(np.round((0.6 - 0.5 * x + rng.normal(0, 0.05, 10)) * 50), 0, 50)
    cats = ["a"] * 4 + ["b"] * 4 + ["c"] * 2
    res = robustness_at_layer(x, k=k, n=n, personas=names, categories=cats, holdout=["p2"], covariate=rng.normal(size=10), layer=7)
    X = np.column_stack([x + rng.normal(0, s, 10) for s in (0.0, 0.3, 1.0)])
    sweep = layer_sweep(X, k=k, n=n, personas=names, layers=[7, 8, 9], primary_layer=8, n_permutations=200, n_bootstrap=100)
    return res, sweep, names, x, k / n


def _external_sources(html):
    """Returns the src/href of every script or link tag (script bodies are not parsed as tags)."""
    from html.parser import HTMLParser

    found = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(v for k, v in attrs if tag in ("script", "link") and k in ("src", "href"))

    Parser().feed(html)
    return found


def test_markdown_has_headline_per_layer_and_robustness_tables():
    res, sweep, names, x, rate = _result()
    md = robustness_markdown(res, sweep)
    assert "| persona | cosine | rate | k/n | Wilson 95% CI | category | role |" in md
    i = names.index("p2")
    assert f"| p2 | {x[i]:.3f} | {rate[i]:.3f} |" in md and "held out" in md
    assert "## Per-layer statistics" in md and "| 8† |" in md
    assert "## Robustness" in md and "leave-one-out PI coverage" in md and "partial Spearman" in md
    assert "skipped: fewer than 3 personas (n=2)" in md
    r = stats.pearsonr(x, rate).statistic
    assert f"Pearson r = {r:+.3f}" in md
    assert sweep_markdown(sweep).startswith("# Layer sweep")


def test_write_analysis_writes_json_markdown_and_offline_html(tmp_path):
    from plotly.offline import get_plotlyjs

    res, sweep, *_ = _result()
    out = write_analysis(res, json_path=tmp_path / "r.json", markdown_path=tmp_path / "r.md", figure_path=tmp_path / "hero.html", sweep=sweep)
    data = json.loads(out["json"].read_text())
    assert data["n_personas"] == 10 and "provenance" in data and "package_versions" in data["provenance"]
    html = out["figure"].read_text()
    # Offline: the only script it loads is the plotly.min.js written beside it.
    assert _external_sources(html) == ["plotly.min.js"] and "Plotly.newPlot" in html
    assert (tmp_path / "plotly.min.js").read_text() == get_plotlyjs()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hero.html", "plotly.min.js", "r.json", "r.md"]  # no temp files left


def test_html_figures_share_one_plotlyjs_per_folder_or_inline_it(tmp_path):
    res, sweep, *_ = _result()
    for name in ("a", "b", "c"):
        write_figure(sweep_curve(sweep), tmp_path / f"{name}.html")
    js = [p.name for p in tmp_path.iterdir() if p.suffix == ".js"]
    assert js == ["plotly.min.js"] and all((tmp_path / f"{n}.html").stat().st_size < 200_000 for n in "abc")
    inline = write_figure(hero_scatter(res), tmp_path / "inline" / "x.html", plotlyjs="inline").read_text()
    assert _external_sources(inline) == [] and len(inline) > 1_000_000
    with pytest.raises(ValueError, match="'plotlyjs' parameter of write_figure"):
        write_figure(hero_scatter(res), tmp_path / "y.html", plotlyjs="web")


def test_hero_scatter_has_category_traces_stars_and_pi_band():
    res, *_ = _result()
    fig = hero_scatter(res)
    names = [t.name for t in fig.data]
    assert "95% prediction interval" in names and any(n.startswith("OLS fit") for n in names)
    stars = [t for t in fig.data if t.marker is not None and t.marker.symbol == "star"]
    assert len(stars) == 1 and list(stars[0].text) == ["p2"]
    h = res.holdout[0]
    whiskers = [t for t in fig.data if t.name.startswith("held out: 95% PI")]
    assert len(whiskers) == 1 and list(whiskers[0].y[:2]) == pytest.approx([max(0, h.pi_lower), min(1, h.pi_upper)])
    assert {"a (fitted)", "b (fitted)", "c (fitted)"} <= set(names)


def test_sweep_curve_marks_primary_and_significance():
    _, sweep, *_ = _result()
    fig = sweep_curve(sweep)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 2
    np.testing.assert_allclose(lines[1].y, sweep.spearman_rho)
    significant = sweep.spearman_p_holm < 0.05
    colors = lines[1].marker.color
    assert [c != "white" for c in colors] == list(significant)
    assert any("primary: 8" in (a.text or "") for a in fig.layout.annotations)


def _rate_axis_values(fig):
    """Returns every y a trace draws on the rate axis, error-bar ends included."""
    ys = []
    for t in fig.data:
        y = np.array([np.nan if v is None else v for v in t.y], dtype=float)
        ys.append(y[np.isfinite(y)])
        e = t.error_y
        if e is not None and e.array is not None:
            ys.append(y + np.asarray(e.array, dtype=float))
            ys.append(y - np.asarray(e.arrayminus, dtype=float))
    return np.concatenate(ys)


def _steep_result():
    """A fit whose line and band leave [0, 1] inside the x range: rates near 0 and 1 at the ends."""
    x = np.linspace(-0.6, 1.0, 12)
    n = np.full(12, 40)
    k = np.clip(np.round((0.9 - 0.95 * (x + 0.6)) * 40), 0, 40)
    names = ["helpful_assistant"] + [f"persona_{i}" for i in range(11)]
    return robustness_at_layer(x[::-1], k=k, n=n, personas=names, categories=["a"] * 6 + ["b"] * 6, reference="helpful_assistant", layer=15)


def test_hero_scatter_stays_in_the_rate_range_with_wilson_bars_and_reference():
    from statsmodels.stats.proportion import proportion_confint

    res = _steep_result()
    # The unclipped OLS band does leave [0, 1] here, so the clipping is what keeps the figure honest.
    from persona_geometry.analysis.robustness import ols, prediction_intervals

    raw = prediction_intervals(ols(res.x, res.rate), np.linspace(res.x.min(), res.x.max(), 50), res.alpha)
    assert raw["obs_ci_lower"].min() < 0 or raw["obs_ci_upper"].max() > 1
    fig = hero_scatter(res)
    values = _rate_axis_values(fig)
    assert values.min() >= 0.0 and values.max() <= 1.0
    points = [t for t in fig.data if t.mode == "markers+text"]
    seen = {}
    for t in points:
        assert t.error_y is not None and t.error_y.array is not None  # Wilson bars on every point
        for name, y, up, down in zip([c[0] for c in t.customdata], t.y, t.error_y.array, t.error_y.arrayminus, strict=True):
            seen[name] = (y - down, y + up)
    i = res.personas.index("persona_3")
    lo, hi = proportion_confint(int(res.k[i]), int(res.n[i]), alpha=0.05, method="wilson")
    assert seen["persona_3"] == pytest.approx((lo, hi))
    assert len(seen) == 12
    ref = [t for t in points if t.marker.symbol == "diamond"]
    assert len(ref) == 1 and ref[0].customdata[0][0] == "helpful_assistant" and "reference" in ref[0].name
    assert fig.layout.xaxis.title.text == "centered cosine to helpful_assistant, layer 15"
    assert fig.layout.yaxis.title.text.startswith("source rate")
    r, rho = stats.pearsonr(res.x, res.rate).statistic, stats.spearmanr(res.x, res.rate).statistic
    assert f"r = {r:+.2f}, ρ = {rho:+.2f}, n = 12" in fig.layout.title.text
    # The study's title keeps the statistics.
    assert "n = 12" in hero_scatter(res, title="my study").layout.title.text
    assert fig.layout.width >= 900 and fig.layout.height >= 600


def test_scatter_labels_do_not_overprint():
    from persona_geometry.analysis.figures import _label_positions

    # Three names at nearly one spot, one far away: no two placed boxes may overlap.
    px, py = np.array([100.0, 104.0, 108.0, 400.0]), np.array([200.0, 202.0, 198.0, 100.0])
    names = ["police_officer", "librarian", "medical_doctor", "villain"]
    pos = _label_positions(px, py, names, (600, 400))
    assert pos[3] is not None and sum(p is not None for p in pos[:3]) >= 2
    boxes = []
    for x, y, name, p in zip(px, py, names, pos, strict=True):
        if p is None:
            continue
        w, h = 7.5 * len(name) + 4, 16
        vert, horiz = p.split()
        cy = {"top": y - 8 - h / 2, "bottom": y + 8 + h / 2, "middle": y}[vert]
        cx = {"center": x, "right": x + 8 + w / 2, "left": x - 8 - w / 2}[horiz]
        if vert != "middle" and horiz != "center":
            cx = x + (w / 2 if horiz == "right" else -w / 2)
        boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            A, B = boxes[a], boxes[b]
            assert not (A[0] < B[2] and B[0] < A[2] and A[1] < B[3] and B[1] < A[3])


def test_sweep_curve_bands_are_lines_and_layer_ticks_integers():
    _, sweep, *_ = _result()
    fig = sweep_curve(sweep)
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 2 and all(t.mode == "lines" for t in bands)
    assert fig.layout.xaxis.tickmode == "linear" and fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tick0 == 7
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_cosine_heatmap_has_one_slider_step_per_layer():
    rng = np.random.default_rng(0)
    v = torch.tensor(rng.uniform(-1, 1, size=(4, 3, 3)))
    pc = PairwiseCosine(values=v, personas=("a", "b", "c"), layers=(0, 5, 10, 15), centered_on=("a", "b", "c"))
    fig = cosine_heatmap(pc)
    assert len(fig.data) == 4 and [t.visible for t in fig.data] == [True, False, False, False]
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["0", "5", "10", "15"]
    assert steps[2].args[0]["visible"] == [False, False, True, False]
    # plotly.js reads the title from "title.text" in a step's layout update, never from "title": str.
    for step, layer in zip(steps, (0, 5, 10, 15), strict=True):
        assert set(step.args[1]) == {"title.text"} and step.args[1]["title.text"].endswith(f"layer {layer}")
    assert fig.layout.title.text.endswith("layer 0") and "centered cosine" in fig.layout.title.text.lower()
    z = np.array(fig.data[3].z, dtype=float)
    expected = v[3].numpy().copy()
    np.fill_diagonal(expected, np.nan)
    np.testing.assert_allclose(z, expected)  # the diagonal is blank
    for k, t in enumerate(fig.data):
        off = v[k].numpy()[~np.eye(3, dtype=bool)]
        assert t.zmax == pytest.approx(np.abs(off).max()) and t.zmin == pytest.approx(-np.abs(off).max())
        assert t.colorbar.title.text == "centered cosine"
    assert fig.layout.sliders[0].y < 0 and fig.layout.sliders[0].yanchor == "top"  # below the names


def test_cosine_heatmap_grid_shares_one_scale_over_chosen_layers():
    rng = np.random.default_rng(1)
    v = rng.uniform(-1, 1, size=(8, 4, 4))
    for k in range(8):
        np.fill_diagonal(v[k], 1.0)
    pc = PairwiseCosine(values=torch.tensor(v), personas=("a", "b", "c", "d"), layers=tuple(range(0, 16, 2)), centered_on=("a", "b"))
    fig = cosine_heatmap_grid(pc, [2, 6, 10, 14], columns=2)
    assert [t.name for t in fig.data] == ["layer 2", "layer 6", "layer 10", "layer 14"]
    assert [a.text for a in fig.layout.annotations] == ["layer 2", "layer 6", "layer 10", "layer 14"]
    off = v[[1, 3, 5, 7]][:, ~np.eye(4, dtype=bool)]
    assert fig.layout.coloraxis.cmax == pytest.approx(np.abs(off).max()) and fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax
    assert fig.layout.coloraxis.colorbar.title.text == "centered cosine"
    assert all(np.isnan(np.array(t.z, dtype=float).diagonal()).all() for t in fig.data)
    with pytest.raises(ValueError, match="'layers' parameter of cosine_heatmap_grid"):
        cosine_heatmap_grid(pc, [3])
    assert len(cosine_heatmap_grid(pc).data) == 6  # default: six evenly spaced layers


def test_static_export_without_kaleido_fails_before_writing_anything(tmp_path, monkeypatch):
    import sys

    from persona_geometry.analysis import figures, write_figures

    res, sweep, *_ = _result()
    monkeypatch.setattr(figures, "_static_ok", False)
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido raises ImportError
    with pytest.raises(ImportError, match=r"persona-geometry\[figures\]"):
        write_figures({"scatter": hero_scatter(res), "sweep": sweep_curve(sweep)}, tmp_path / "out", formats=("html", "png"))
    assert not (tmp_path / "out").exists()


def test_static_export_without_a_browser_says_so_in_one_line(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    from persona_geometry.analysis import figures

    if importlib.util.find_spec("kaleido") is None:
        pytest.skip("kaleido is not installed")

    def no_browser(self, *a, **k):
        raise RuntimeError("Could not find Chrome\nsecond line")

    monkeypatch.setattr(figures, "_static_ok", False)
    monkeypatch.setattr(go.Figure, "to_image", no_browser)
    with pytest.raises(RuntimeError) as info:
        write_figure(sweep_curve(_result()[1]), tmp_path / "s.pdf")
    assert "\n" not in str(info.value) and "'figures' extra" in str(info.value) and "chromium" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def _static_export_available():
    from persona_geometry.analysis import check_static_export

    try:
        check_static_export(["png"])
    except (ImportError, RuntimeError):
        return False
    return True


@pytest.mark.slow
def test_every_figure_renders_to_static_images_at_the_chosen_size(tmp_path):
    import struct

    from persona_geometry.analysis import write_figures

    if not _static_export_available():
        pytest.skip("kaleido or a Chromium is missing")
    res, sweep, *_ = _result()
    v = torch.tensor(np.random.default_rng(0).uniform(-1, 1, size=(3, 10, 10)))
    pc = PairwiseCosine(values=v, personas=tuple(res.personas), layers=(7, 8, 9), centered_on=tuple(res.personas))
    figs = {"scatter": hero_scatter(res), "sweep": sweep_curve(sweep), "heatmap": cosine_heatmap(pc), "grid": cosine_heatmap_grid(pc)}
    written = write_figures(figs, tmp_path, formats=("png", "svg"), width=800, height=500, scale=2)
    assert len(written) == 8
    for name in figs:
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png[:4] == b"\x89PNG" and struct.unpack(">II", png[16:24]) == (1600, 1000)
        svg = (tmp_path / f"{name}.svg").read_text()
        assert figs[name].layout.title.text.split("<br>")[0][:20].replace("&", "&amp;") in svg
    assert "cosine, layer 7" in (tmp_path / "scatter.svg").read_text()


def test_static_export_needs_kaleido_and_says_so(tmp_path):
    res, *_ = _result()
    fig = hero_scatter(res)
    with pytest.raises(ValueError, match=r"\.html"):
        write_figure(fig, tmp_path / "figure.txt")
    if importlib.util.find_spec("kaleido") is None:
        with pytest.raises(ImportError, match=r"persona-geometry\[figures\].*chromium"):
            write_figure(fig, tmp_path / "figure.png")
    else:
        try:
            path = write_figure(fig, tmp_path / "figure.png")
        except RuntimeError as e:  # kaleido without a browser: the message must say what to install
            assert "chromium" in str(e).lower()
        else:
            assert path.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "figure.png").exists() or (tmp_path / "figure.png").stat().st_size > 0
