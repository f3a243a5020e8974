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
    res, sweep, *_ = _result()
    out = write_analysis(res, json_path=tmp_path / "r.json", markdown_path=tmp_path / "r.md", figure_path=tmp_path / "hero.html", sweep=sweep)
    data = json.loads(out["json"].read_text())
    assert data["n_personas"] == 10 and "provenance" in data and "package_versions" in data["provenance"]
    html = out["figure"].read_text()
    # Self-contained: plotly.js is inlined; no <script> or <link> tag loads anything.
    assert _external_sources(html) == []
    assert len(html) > 1_000_000 and "Plotly.newPlot" in html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hero.html", "r.json", "r.md"]  # no temp files left


def test_hero_scatter_has_category_traces_stars_and_pi_band():
    res, *_ = _result()
    fig = hero_scatter(res)
    names = [t.name for t in fig.data]
    assert "95% prediction interval" in names and any(n.startswith("OLS fit") for n in names)
    stars = [t for t in fig.data if t.marker is not None and t.marker.symbol == "star"]
    assert len(stars) == 1 and list(stars[0].text) == ["p2"]
    h = res.holdout[0]
    assert stars[0].error_y.array[0] == pytest.approx(h.pi_upper - h.observed)
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


def test_cosine_heatmap_has_one_slider_step_per_layer():
    rng = np.random.default_rng(0)
    v = torch.tensor(rng.uniform(-1, 1, size=(4, 3, 3)))
    pc = PairwiseCosine(values=v, personas=("a", "b", "c"), layers=(0, 5, 10, 15), centered_on=None)
    fig = cosine_heatmap(pc)
    assert len(fig.data) == 4 and [t.visible for t in fig.data] == [True, False, False, False]
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["0", "5", "10", "15"]
    assert steps[2].args[0]["visible"] == [False, False, True, False]
    np.testing.assert_allclose(fig.data[3].z, v[3].numpy())


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
