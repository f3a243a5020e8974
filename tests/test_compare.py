"""Comparing finished studies: relative depth, meta-analysis, seed pooling, refusals.

The study folders are made by ``run_study``'s own sweep and report stages, from activations
and eval counts written in the formats the extract and eval stages write (random tensors and
binomial counts instead of a model, so each study costs a fraction of a second).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from persona_geometry.activations import ActivationSet
from persona_geometry.analysis import compare_studies, read_study, write_comparison
from persona_geometry.personas import builtin_personas

QUESTIONS = ["q one?", "q two?", "q three?"]


def _make_study(root, name, *, model, n_layers, seeds, personas=None, geometry_seed=0, rate_seed=0, primary_layer=1):
    """Writes a finished study folder and returns it: activations, eval counts, then sweep and report by run_study."""
    from persona_geometry.pipeline.config import StudyConfig
    from persona_geometry.pipeline.study import run_study

    persona_set = builtin_personas() if personas is None else builtin_personas().select(personas)
    names = persona_set.names
    out = root / name
    out.mkdir(parents=True)
    (out / "personas.yaml").write_text(yaml.safe_dump({"personas": persona_set.to_list()}))
    g = torch.Generator().manual_seed(geometry_seed)
    # One geometry per model: every persona's rows are drawn from its own generator.
    acts = torch.stack([torch.randn(len(QUESTIONS), n_layers, 16, generator=torch.Generator().manual_seed(1000 * geometry_seed + builtin_personas().names.index(p))) for p in names])
    acts = acts + 0.5 * torch.randn(1, 1, n_layers, 16, generator=g)
    n_tokens = torch.full((len(names), len(QUESTIONS)), 20) + torch.arange(len(names))[:, None]
    store = out / "cache" / "acts"
    ActivationSet({"resid_post": acts}, personas=persona_set, questions=QUESTIONS, layers=range(n_layers), n_tokens=n_tokens,
                  manifest={"model_id": model, "n_layers": n_layers}).save(store)  # fmt: skip
    (out / "extract").mkdir()
    (out / "extract" / ".stage.json").write_text(json.dumps({"key": "x", "done": True, "files": {"activations": str(store)}}))
    # The model fixes each persona's true rate; the seed draws the counts.
    truth = {p: 0.1 + 0.8 * np.random.default_rng(1000 * geometry_seed + builtin_personas().names.index(p)).random() for p in names}
    for seed in seeds:
        for source in names:
            rows = []
            for target in names:
                rng = np.random.default_rng([rate_seed, seed, *(builtin_personas().names.index(p) for p in (source, target))])
                n = 20
                k = int(rng.binomial(n, truth[source] if target == source else truth[target] / 4))
                rows.append({"persona": target, "k": k, "n": n, "rate": k / n, "is_source": target == source})
            folder = out / "eval" / source / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "run_result.json").write_text(json.dumps({"source": source, "personas": rows, "rates": {r["persona"]: r for r in rows}}))
    config = StudyConfig.from_dict(
        {
            "name": name,
            "out": str(out),
            "model": {"name": model, "dtype": "float32", "device": "cpu"},
            "personas": str(out / "personas.yaml"),
            "marker": {"sources": "all", "seeds": list(seeds)},
            "analysis": {"primary_layer": primary_layer, "n_permutations": 200, "n_bootstrap": 100},
        }
    )
    run_study(config, stages=["sweep", "report"], progress=False)
    return out


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    return {
        "a4": _make_study(root, "a4", model="tiny-4", n_layers=4, seeds=[1], geometry_seed=1, rate_seed=1),
        "b6s1": _make_study(root, "b6s1", model="tiny-6", n_layers=6, seeds=[1], geometry_seed=2, rate_seed=2, primary_layer=3),
        "b6s2": _make_study(root, "b6s2", model="tiny-6", n_layers=6, seeds=[2, 3], geometry_seed=2, rate_seed=2, primary_layer=3),
    }


def _counts(folder, seeds):
    """Returns {persona: {seed: (k, n)}} read straight from the eval run results."""
    out = {}
    for seed in seeds:
        for path in sorted((folder / "eval").glob(f"*/seed{seed}/run_result.json")):
            data = json.loads(path.read_text())
            row = next(r for r in data["personas"] if r["persona"] == data["source"])
            out.setdefault(data["source"], {})[seed] = (row["k"], row["n"])
    return out


def test_read_study_takes_blocks_from_the_manifest_and_values_from_the_sweep(studies):
    a = read_study(studies["a4"])
    sweep = json.loads((studies["a4"] / "sweep" / "sweep.json").read_text())
    assert a.n_layers == 4 and a.layers == (0, 1, 2, 3) and a.model == "tiny-4" and a.seeds == (1,)
    assert a.personas == tuple(builtin_personas().names) and a.reference == "helpful_assistant"
    rho, p = a.at(1, "spearman")
    assert rho == sweep["per_layer"][1]["spearman"]["rho"] and p == sweep["per_layer"][1]["spearman"]["p"]
    # The sweep's own ρ is Spearman of the cosine against the pooled source rate.
    report = json.loads((studies["a4"] / "report" / "report.json").read_text())
    rates = [report["rates"][q] for q in report["personas"]]
    assert rho == pytest.approx(stats.spearmanr([report["x"][q] for q in report["personas"]], rates).statistic, abs=1e-12)


def test_relative_depth_aligns_studies_of_different_depth(studies):
    result = compare_studies([studies["a4"], studies["b6s1"]], depth=0.5)
    assert result.meta.layers == (2, 3)  # 2/4 and 3/6
    np.testing.assert_allclose(result.meta.depths, [0.5, 0.5])
    # 0.4: layer 2 of 4 (0.5) beats 1 (0.25); layer 2 of 6 (0.333) beats 3 (0.5).
    assert compare_studies([studies["a4"], studies["b6s1"]], depth=0.4).meta.layers == (2, 2)
    curves = result.curves()
    six = curves[curves["study"] == "b6s1"]
    np.testing.assert_allclose(six["relative_depth"], np.arange(6) / 6)
    sweep = json.loads((studies["b6s1"] / "sweep" / "sweep.json").read_text())
    np.testing.assert_allclose(six["ci_low"], [row["spearman"]["ci"][0] for row in sweep["per_layer"]])
    table = result.to_frame().set_index("study")
    assert table.loc["a4", "n_layers"] == 4 and table.loc["b6s1", "primary_layer"] == 3
    assert table.loc["b6s1", "primary_value"] == sweep["per_layer"][3]["spearman"]["rho"]
    assert table.loc["b6s1", "best_layer"] == sweep["best_layer"] and table.loc["b6s1", "max_statistic_p"] == sweep["max_statistic"]["p"]
    fig = result.figure()
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    np.testing.assert_allclose(lines[1].x, np.arange(6) / 6)
    # Default depth: the first study's primary layer, 1 of 4.
    assert compare_studies([studies["a4"], studies["b6s1"]]).meta.depth == 0.25


def test_meta_analysis_is_dersimonian_laird_on_fisher_z(studies):
    paths = [studies["a4"], studies["b6s1"], studies["b6s2"]]
    m = compare_studies(paths, depth=0.5).meta
    rs, ns = [], []
    for path, layer in zip(paths, (2, 3, 3), strict=True):
        row = json.loads((path / "sweep" / "sweep.json").read_text())["per_layer"][layer]
        rs.append(row["spearman"]["rho"])
        ns.append(row["n"])
    rs, ns = np.array(rs), np.array(ns)
    np.testing.assert_allclose(m.r, rs)
    # By hand: Fisher z, Bonett-Wright variance, DerSimonian-Laird τ², inverse-variance weights.
    z = np.arctanh(rs)
    v = (1 + rs**2 / 2) / (ns - 3)
    w = 1 / v
    z_fixed = (w * z).sum() / w.sum()
    q = (w * (z - z_fixed) ** 2).sum()
    tau2 = max(0.0, (q - 2) / (w.sum() - (w**2).sum() / w.sum()))
    ws = 1 / (v + tau2)
    z_random = (ws * z).sum() / ws.sum()
    se = math.sqrt(1 / ws.sum())
    assert m.q == pytest.approx(q) and m.tau2 == pytest.approx(tau2, abs=1e-12)
    assert m.i2 == pytest.approx(max(0.0, (q - 2) / q))
    assert m.fixed_r == pytest.approx(math.tanh(z_fixed))
    assert m.random_r == pytest.approx(math.tanh(z_random))
    assert m.random_ci == pytest.approx((math.tanh(z_random - 1.959964 * se), math.tanh(z_random + 1.959964 * se)), abs=1e-6)
    assert m.random_p == pytest.approx(2 * stats.norm.sf(abs(z_random / se)))
    assert m.q_p == pytest.approx(stats.chi2.sf(q, 2))
    assert m.sign_agrees == bool(len(set(np.sign(rs))) == 1)


def test_meta_analysis_truncates_tau2_and_i2_at_zero_when_studies_agree(studies):
    a = read_study(studies["a4"])
    m = compare_studies([a, a]).meta  # Q = 0 < df: statsmodels' one-step tau² would be negative
    assert m.tau2 == 0 and m.i2 == 0 and m.q == pytest.approx(0, abs=1e-12)
    z, v = m.z[0], m.variance[0]
    se = math.sqrt(v / 2)
    assert m.random_r == pytest.approx(math.tanh(z)) and m.random_r == m.fixed_r
    assert m.random_ci == pytest.approx((math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)), abs=1e-6)
    assert m.random_p == pytest.approx(2 * stats.norm.sf(abs(z / se)))


def test_seed_pooling_adds_the_counts_of_every_seed(studies):
    result = compare_studies([studies["a4"], studies["b6s1"], studies["b6s2"]])
    assert len(result.seed_groups) == 1
    g = result.seed_groups[0]
    assert g.model == "tiny-6" and g.studies == ("b6s1", "b6s2")
    counts = _counts(studies["b6s1"], [1])
    for p, per in _counts(studies["b6s2"], [2, 3]).items():
        counts[p].update(per)
    frame = g.to_frame().set_index("persona")
    assert list(g.seed_corr.columns) == ["1", "2", "3"]
    rates = {}
    for p, per in counts.items():
        k, n = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
        assert (frame.loc[p, "k"], frame.loc[p, "n"]) == (k, n)
        low, high = proportion_confint(k, n, method="wilson")
        assert frame.loc[p, "wilson_low"] == pytest.approx(low) and frame.loc[p, "wilson_high"] == pytest.approx(high)
        rates[p] = [per[s][0] / per[s][1] for s in (1, 2, 3)]
        assert frame.loc[p, "rate_sd"] == pytest.approx(np.std(rates[p], ddof=1))
    names = list(frame.index)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        expected = stats.spearmanr([rates[p][a] for p in names], [rates[p][b] for p in names]).statistic
        assert g.seed_corr.iloc[a, b] == pytest.approx(expected)
    reports = [json.loads((studies[s] / "report" / "report.json").read_text()) for s in ("b6s1", "b6s2")]
    sweeps = [json.loads((studies[s] / "sweep" / "sweep.json").read_text()) for s in ("b6s1", "b6s2")]
    rhos = [sw["per_layer"][3]["spearman"]["rho"] for sw in sweeps]
    assert g.sign_holds == (np.sign(rhos[0]) == np.sign(rhos[1]))
    assert g.significant_in == tuple(s for s, sw in zip(("b6s1", "b6s2"), sweeps, strict=True) if sw["per_layer"][3]["spearman"]["p"] < 0.05)
    assert set(g.influential_everywhere) == set(reports[0]["influential"]) & set(reports[1]["influential"])
    assert set(g.influential_somewhere) == set(reports[0]["influential"]) | set(reports[1]["influential"])


def test_studies_that_differ_in_more_than_seeds_are_not_pooled(tmp_path, studies):
    other = _make_study(tmp_path, "b6lr", model="tiny-6", n_layers=6, seeds=[5], geometry_seed=2, rate_seed=3, primary_layer=2)
    result = compare_studies([studies["b6s1"], other])
    assert result.seed_groups == () and "analysis.primary_layer" in result.not_replicates[0]


def test_mismatched_personas_are_refused_in_one_line_or_intersected(tmp_path, studies):
    shared = [p for p in builtin_personas().names if p not in ("villain", "comedian")]
    narrow = _make_study(tmp_path, "a4narrow", model="tiny-4", n_layers=4, seeds=[1], personas=shared, geometry_seed=3, rate_seed=4)
    with pytest.raises(ValueError, match=r"lacks \['comedian', 'villain'\]") as e:
        compare_studies([studies["a4"], narrow])
    assert "\n" not in str(e.value)
    result = compare_studies([studies["a4"], narrow], intersect=True)
    assert result.intersected and result.personas == tuple(shared) and result.dropped == {"a4": ("comedian", "villain")}
    assert "shares" in result.summary()
    # The recomputed study is what run_study writes for the same activations and counts on those personas.
    subset = _make_study(tmp_path, "a4subset", model="tiny-4", n_layers=4, seeds=[1], personas=shared, geometry_seed=1, rate_seed=1)
    expected = json.loads((subset / "sweep" / "sweep.json").read_text())
    got = result.studies[0].sweep
    assert got["personas"] == expected["personas"] and got["best_layer"] == expected["best_layer"]
    for mine, theirs in zip(got["per_layer"], expected["per_layer"], strict=True):
        assert mine["spearman"]["rho"] == pytest.approx(theirs["spearman"]["rho"], abs=1e-12)
        assert mine["pearson"]["r"] == pytest.approx(theirs["pearson"]["r"], abs=1e-12)
    report = json.loads((subset / "report" / "report.json").read_text())
    assert result.studies[0].report["influential"] == report["influential"]


def test_a_different_reference_is_refused(tmp_path, studies):
    import dataclasses

    a, b = read_study(studies["a4"]), read_study(studies["b6s1"])
    with pytest.raises(ValueError, match="one reference persona"):
        compare_studies([a, dataclasses.replace(b, reference="villain")])
    with pytest.raises(ValueError, match="two or more"):
        compare_studies([studies["a4"]])
    with pytest.raises(ValueError, match="not a finished study"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "config.resolved.yaml").write_text("name: half\n")
        compare_studies([studies["a4"], tmp_path / "half"])


def test_write_comparison_writes_every_file(tmp_path, studies):
    result = compare_studies([studies["a4"], studies["b6s1"], studies["b6s2"]], depth=0.5)
    written = write_comparison(result, tmp_path / "cmp")
    payload = json.loads(written["json"].read_text())
    assert payload["meta_analysis"]["random"]["r"] == pytest.approx(result.meta.random_r)
    assert [s["study"] for s in payload["studies"]] == ["a4", "b6s1", "b6s2"]
    assert payload["seed_groups"][0]["personas"]["villain"]["n"] == 60
    md = written["markdown"].read_text()
    assert "## Combined estimate" in md and "## Seeds of `tiny-6`" in md
    assert "plotly" in written["figure"].read_text()[:5000].lower()
    assert not list((tmp_path / "cmp").glob(".*.tmp"))


def test_cli_compare_writes_the_report_and_refuses_mismatches_in_one_line(tmp_path, studies, capsys):
    from persona_geometry.pipeline.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", str(studies["a4"]), str(studies["b6s1"]), "--depth", "0.5", "--out", str(out)]) == 0
    payload = json.loads((out / "compare.json").read_text())
    assert payload["meta_analysis"]["depth"] == 0.5 and [s["layer"] for s in payload["meta_analysis"]["studies"]] == [2, 3]
    assert (out / "compare.md").is_file() and (out / "compare_sweeps.html").is_file() and (out / "curves.csv").is_file()
    capsys.readouterr()
    assert main(["compare", str(studies["a4"]), str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("persona-geometry compare: error:") and err.count("\n") == 1
    assert main(["compare", str(studies["a4"]), str(studies["b6s1"]), "--depth", "1.5", "--out", str(out)]) == 2
    assert "relative depth in [0, 1]" in capsys.readouterr().err
