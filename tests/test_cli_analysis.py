"""`persona-geometry analyze` and `sweep` end to end on CSV files written here."""

import json

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.outliers_influence import OLSInfluence
from statsmodels.stats.proportion import proportion_confint

from persona_geometry.pipeline.cli import main


def _table(seed=0, P=11):
    rng = np.random.default_rng(seed)
    names = [f"persona_{i}" for i in range(P)]
    x = rng.uniform(-0.5, 0.9, P)
    x[0] = 1.0
    n = np.full(P, 100)
    k = np.clip(np.round((0.6 - 0.5 * x + rng.normal(0, 0.06, P)) * 100), 0, 100).astype(int)
    k[0] = 2
    cats = ["occupational"] * 4 + ["character"] * 4 + ["generic"] * (P - 8)
    return pd.DataFrame({"persona": names, "cos_l20": x, "marks": k, "total": n, "cat": cats, "tok": rng.uniform(2.5, 4.5, P)})


def test_analyze_writes_json_whose_values_match_statsmodels(tmp_path, capsys):
    table = _table()
    path = tmp_path / "table.csv"
    table.to_csv(path, index=False)
    out = tmp_path / "out"
    argv = [
        "analyze", str(path), "--x", "cos_l20", "--k", "marks", "--n", "total", "--category", "cat",
        "--covariate", "tok", "--holdout", "persona_3,persona_7", "--reference", "persona_0",
        "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--figure", str(out / "hero.html"),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "Pearson r" in capsys.readouterr().out
    d = json.loads((out / "r.json").read_text())
    x = table.cos_l20.to_numpy()
    rate = (table.marks / table.total).to_numpy()
    assert d["n_personas"] == 11
    assert d["pearson"]["r"] == pytest.approx(stats.pearsonr(x, rate).statistic, abs=1e-12)
    assert d["spearman"]["p"] == pytest.approx(stats.spearmanr(x, rate).pvalue, rel=1e-9)
    held = [3, 7]
    fit_idx = [i for i in range(11) if i not in held]
    ols = sm.OLS(rate[fit_idx], sm.add_constant(x[fit_idx])).fit()
    assert d["fit"]["slope"] == pytest.approx(ols.params[1], rel=1e-10)
    assert d["fit"]["r2"] == pytest.approx(ols.rsquared, rel=1e-10)
    frame = ols.get_prediction(sm.add_constant(x[held], has_constant="add")).summary_frame(alpha=0.05)
    for row, h in zip(d["holdout"], held, strict=True):
        assert row["persona"] == f"persona_{h}"
        assert row["pi_lower"] == pytest.approx(frame.obs_ci_lower.iloc[held.index(h)], rel=1e-10)
        assert row["pi_upper"] == pytest.approx(frame.obs_ci_upper.iloc[held.index(h)], rel=1e-10)
        assert row["inside"] == bool(row["pi_lower"] <= rate[h] <= row["pi_upper"])
    cooks = OLSInfluence(ols).cooks_distance[0]
    assert d["cooks_distance"] == pytest.approx({f"persona_{i}": c for i, c in zip(fit_idx, cooks, strict=True)}, rel=1e-9)
    assert d["cooks_threshold"] == pytest.approx(4 / 9)
    assert d["loo_pi_coverage"]["total"] == 9 * 2
    lo, hi = proportion_confint(table.marks, table.total, alpha=0.05, method="wilson")
    assert d["wilson"]["persona_5"] == pytest.approx([lo[5], hi[5]], abs=1e-12)
    assert d["partial_spearman"]["covariate"] == "tok"
    assert set(d["within_category"]) == {"occupational", "character", "generic"}
    assert d["within_category"]["generic"]["n"] == 3
    assert d["without_reference"]["pearson"]["r"] == pytest.approx(stats.pearsonr(x[1:], rate[1:]).statistic, abs=1e-12)
    assert d["provenance"]["input_sha256"] and d["provenance"]["arguments"]["holdout"] == ["persona_3", "persona_7"]
    assert "## Robustness" in (out / "r.md").read_text()
    # Offline: the figure loads the one plotly.min.js written beside it.
    assert 'src="plotly.min.js"' in (out / "hero.html").read_text() and (out / "plotly.min.js").stat().st_size > 1_000_000


@pytest.mark.parametrize("layout", ["long", "wide"])
def test_sweep_long_and_wide_tables(tmp_path, layout):
    rng = np.random.default_rng(1)
    P, layers = 9, [0, 4, 8]
    names = [f"p{i}" for i in range(P)]
    cos = rng.normal(size=(P, 3))
    k = rng.integers(0, 50, P)
    n = np.full(P, 50)
    if layout == "long":
        table = pd.DataFrame([{"persona": p, "layer": layer, "cosine": cos[i, j], "k": k[i], "n": n[i]} for i, p in enumerate(names) for j, layer in enumerate(layers)])
    else:
        table = pd.DataFrame({"persona": names, "k": k, "n": n, **{f"layer_{layer}": cos[:, j] for j, layer in enumerate(layers)}})
    path = tmp_path / "sweep.csv"
    table.to_csv(path, index=False)
    argv = ["sweep", str(path), "--k", "k", "--n", "n", "--primary-layer", "4", "--permutations", "300", "--bootstrap", "100",
            "--csv", str(tmp_path / "s.csv"), "--json", str(tmp_path / "s.json"), "--figure", str(tmp_path / "s.html")]  # fmt: skip
    assert main(argv) == 0
    per_layer = pd.read_csv(tmp_path / "s.csv")
    assert list(per_layer.layer) == layers
    for j in range(3):
        assert per_layer.spearman_rho[j] == pytest.approx(stats.spearmanr(cos[:, j], k / n).statistic, abs=1e-12)
        assert per_layer.pearson_p[j] == pytest.approx(stats.pearsonr(cos[:, j], k / n).pvalue, rel=1e-9)
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["primary_layer"] == 4 and d["primary"]["layer"] == 4 and 0 < d["max_statistic"]["p"] <= 1
    assert (tmp_path / "s.html").exists()


@pytest.mark.parametrize(
    ("extra", "rows", "message"),
    [
        (["--x", "cosine"], None, "'x' parameter of analyze"),
        (["--x", "cos_l20", "--holdout", "nobody"], None, "holdout"),
        (["--x", "cos_l20", "--reference", "nobody"], None, "reference"),
        (["--x", "cos_l20"], lambda t: t.assign(marks=t.total + 5), "k <= n"),
        (["--x", "cos_l20"], lambda t: t.assign(marks=-1), "counts >= 0"),
        (["--x", "cos_l20"], lambda t: t.iloc[:2], "at least 3 personas"),
        (["--x", "cos_l20"], lambda t: t.assign(cos_l20=0.3), "vary across personas"),
        (["--x", "cos_l20"], lambda t: pd.concat([t, t.iloc[:1]]), "more than once"),
        (["--x", "cos_l20"], lambda t: t.assign(cos_l20=[None] + list(t.cos_l20[1:])), "finite numbers"),
    ],
)
def test_analyze_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, rows, message):
    table = _table()
    if rows is not None:
        table = rows(table)
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    assert main(["analyze", str(path), "--k", "marks", "--n", "total", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("persona-geometry analyze: error:") and message in err


def test_sweep_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.csv"), "--k", "k", "--n", "n"]) == 2
    assert "existing CSV file" in capsys.readouterr().err
    path = tmp_path / "t.csv"
    pd.DataFrame({"persona": ["a", "b", "c"], "k": [1, 2, 3], "n": [5, 5, 5], "foo": [1, 2, 3]}).to_csv(path, index=False)
    assert main(["sweep", str(path), "--k", "k", "--n", "n"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layer columns matching" in err


def test_sweep_wide_layer_column_names_and_custom_pattern(tmp_path, capsys):
    rng = np.random.default_rng(2)
    cos = rng.normal(size=(6, 2))
    rate = rng.uniform(size=6)
    base = {"persona": [f"p{i}" for i in range(6)], "rate": rate}
    path = tmp_path / "w.csv"
    pd.DataFrame({**base, "cos_l3": cos[:, 0], "cos_l11": cos[:, 1]}).to_csv(path, index=False)
    assert main(["sweep", str(path), "--rate", "rate", "--permutations", "0", "--bootstrap", "0", "--json", str(tmp_path / "a.json")]) == 0
    d = json.loads((tmp_path / "a.json").read_text())
    assert d["layers"] == [3, 11]
    assert d["per_layer"][1]["pearson"]["r"] == pytest.approx(stats.pearsonr(cos[:, 1], rate).statistic, abs=1e-12)
    pd.DataFrame({**base, "act_5": cos[:, 0], "act_9": cos[:, 1]}).to_csv(path, index=False)
    argv = ["sweep", str(path), "--rate", "rate", "--layer-pattern", r"^act_(\d+)$", "--permutations", "0", "--bootstrap", "0", "--csv", str(tmp_path / "b.csv")]
    assert main(argv) == 0
    assert list(pd.read_csv(tmp_path / "b.csv").layer) == [5, 9]
    capsys.readouterr()
    assert main(["sweep", str(path), "--rate", "rate", "--layer-pattern", "act_("]) == 2
    assert "regular expression" in capsys.readouterr().err
