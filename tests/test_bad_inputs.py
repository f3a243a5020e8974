"""Bad input is refused with one message naming the parameter: names that would escape a folder,
malformed files, and numbers that would give silently wrong statistics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from persona_geometry import ActivationSet, Persona, PersonaSet, builtin_personas, load_questions
from persona_geometry.geometry import Centroids, center, cosine_to_reference

ESCAPES = ["../../../escaped", "a/b", "..", ".hidden", "a\\b", "tab\there", "new\nline", " padded", "x" * 201]


# --- 4. persona names are safe file names -------------------------------------------------------
@pytest.mark.parametrize("name", ESCAPES)
def test_a_persona_name_that_is_not_one_safe_file_name_is_refused(name):
    with pytest.raises(ValueError, match="The 'name' parameter of Persona must be a name usable as one file name"):
        Persona(name=name, system_prompt="You are someone.")


def test_ordinary_names_still_work():
    for name in ("helpful_assistant", "Kindergarten teacher", "élève-2", "x" * 200):
        assert Persona(name=name, system_prompt="You are someone.").name == name


@pytest.mark.parametrize("name", ESCAPES[:3])
def test_a_persona_file_with_an_escaping_name_is_refused_before_anything_is_written(tmp_path, name, capsys):
    import yaml

    from persona_geometry.pipeline.cli import main

    (tmp_path / "personas.yaml").write_text(yaml.safe_dump({"personas": [
        {"name": "helpful_assistant", "system_prompt": "You are a helpful assistant."},
        {"name": name, "system_prompt": "You are an escaped persona."},
    ]}))  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "name": "escape", "out": str(tmp_path / "out" / "study"), "personas": str(tmp_path / "personas.yaml"),
        "model": {"name": str(tmp_path / "no-model")},
    }))  # fmt: skip
    before = sorted(p for p in tmp_path.rglob("*"))
    status = main(["run", str(tmp_path / "study.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "'name' parameter of Persona" in err[0], err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, inside or outside
    assert not (tmp_path.parent / "escaped").exists()


# --- persona and question files: one line naming the file ---------------------------------------
@pytest.mark.parametrize(
    ("suffix", "text", "fragment"),
    [
        (".yaml", "personas: [", "valid YAML file"),
        (".yaml", "- name: a\n  name: b\n  system_prompt: x\n", "appears twice"),
        (".json", '[{"name": "a", "name": "b", "system_prompt": "x"}]', "appears twice"),
        (".yaml", "- pirate\n- villain\n", "list of persona mappings"),
        (".yaml", "- name: a\n", "file of valid personas"),
        (".txt", "name: a\n", "a .yaml, .yml or .json file"),
    ],
)
def test_a_malformed_persona_file_is_one_line_naming_it(tmp_path, suffix, text, fragment):
    path = tmp_path / f"personas{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        PersonaSet.load(path)
    msg = str(e.value)
    assert "\n" not in msg and "'path' parameter of PersonaSet.load" in msg and fragment in msg
    assert "'p', 'i', 'r'" not in msg  # never the letters of a string taken for a mapping


def test_a_malformed_question_file_is_one_line_naming_it(tmp_path):
    for name, text in (("q.yaml", "- [1, 2]\n- b\n"), ("q.json", "{"), ("q.yaml", "questions: [a, a]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as e:
            load_questions(tmp_path / name)
        assert "\n" not in str(e.value) and "parameter of load_questions" in str(e.value)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9?\n".encode("latin-1"))
    with pytest.raises(ValueError, match="readable UTF-8 file"):
        load_questions(tmp_path / "latin1.txt")


# --- 8. wrong numbers are refused or flagged ----------------------------------------------------
def _sweep_inputs(n=8, layers=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, layers)), rng.uniform(0.05, 0.95, size=n), [f"p{i}" for i in range(n)]


@pytest.mark.parametrize("bad_rate", [1.5, -0.1])
def test_rates_outside_zero_one_are_refused_everywhere(bad_rate):
    from persona_geometry.analysis import layer_sweep, robustness_at_layer

    x, rate, names = _sweep_inputs()
    rate[2] = bad_rate
    with pytest.raises(ValueError, match=r"'y' parameter of layer_sweep must be rates in \[0, 1\]. Got \"rates outside it for \['p2'\]\""):
        layer_sweep(x, y=rate, personas=names, n_permutations=0, n_bootstrap=0)
    with pytest.raises(ValueError, match=r"'y' parameter of robustness_at_layer must be rates in \[0, 1\]"):
        robustness_at_layer(x[:, 0], y=rate, personas=names)


def test_rates_outside_zero_one_are_refused_from_a_table(tmp_path):
    from persona_geometry.analysis.report import analyze_table, sweep_table

    x, rate, names = _sweep_inputs()
    rate[0] = 3.0
    table = tmp_path / "t.csv"
    table.write_text("persona,cos,rate\n" + "".join(f"{p},{x[i, 0]},{rate[i]}\n" for i, p in enumerate(names)))
    with pytest.raises(ValueError, match=r"rates in \[0, 1\]"):
        analyze_table(table, x="cos", rate="rate")
    wide = tmp_path / "w.csv"
    wide.write_text("persona,rate,0,1\n" + "".join(f"{p},{rate[i]},{x[i, 0]},{x[i, 1]}\n" for i, p in enumerate(names)))
    with pytest.raises(ValueError, match=r"rates in \[0, 1\]"):
        sweep_table(wide, rate="rate", n_permutations=0, n_bootstrap=0)


def test_values_that_would_overflow_are_refused_not_turned_into_r_zero():
    from persona_geometry.analysis import layer_sweep, robustness_at_layer

    x, rate, names = _sweep_inputs()
    big = x * 1e155
    # The reference shows what scaling must not change: r is scale-free, float64 overflows.
    with np.errstate(over="ignore", invalid="ignore"):
        assert stats.pearsonr(big[:, 0], rate).statistic == pytest.approx(stats.pearsonr(x[:, 0], rate).statistic)
    with pytest.raises(ValueError, match="'cosine' parameter of layer_sweep must be numbers of magnitude at most 1e\\+150"):
        layer_sweep(big, y=rate, personas=names, n_permutations=0, n_bootstrap=0)
    with pytest.raises(ValueError, match="'x' parameter of robustness_at_layer must be numbers of magnitude at most"):
        robustness_at_layer(big[:, 0], y=rate, personas=names)
    ok = layer_sweep(x * 1e100, y=rate, personas=names, n_permutations=0, n_bootstrap=0)  # large but safe
    assert ok.to_frame()["pearson_r"].iloc[0] == pytest.approx(stats.pearsonr(x[:, 0], rate).statistic)


def _centroids(values: torch.Tensor, names: list[str]) -> Centroids:
    return Centroids(values=values, personas=tuple(names), categories=("c",) * len(names), layers=tuple(range(values.shape[1])), centered_on=None)


def test_a_zero_reference_centroid_is_refused_not_cosine_zero_for_everyone():
    names = ["ref", "a", "b"]
    cents = _centroids(torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(0)), names)
    centered = center(cents, ["ref"])  # centering on the reference alone zeroes it
    with pytest.raises(ValueError, match=r"'reference' parameter of cosine_to_reference must be a persona whose \(centered\) centroid is not zero. Got \"'ref', zero at layers \[0, 1\]\""):
        cosine_to_reference(centered, "ref")
    fine = cosine_to_reference(center(cents), "ref")
    assert torch.allclose(fine.values[0], torch.ones(2, dtype=fine.values.dtype))


def test_nan_activations_give_a_warning_naming_the_persona():
    names = ["ref", "a", "b"]
    values = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(1))
    values[2, 1, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"NaN cosines for \['b'\]"):
        cosine_to_reference(_centroids(values, names), "ref")
    values[2, 1, 3] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cosine_to_reference(_centroids(values, names), "ref")


def test_duplicate_layer_labels_are_refused():
    with pytest.raises(ValueError, match=r"'layers' parameter of ActivationSet must be distinct block indices. Got \[1, 1\]"):
        ActivationSet(
            {"resid_post": torch.zeros(1, 1, 2, 4)}, personas=builtin_personas()[:1], questions=["q?"], layers=[1, 1],
            n_tokens=torch.ones(1, 1, dtype=torch.long),
        )


# --- 7. validation before anything expensive ----------------------------------------------------
@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"analysis": {"primary_layer": 99}}, "'analysis.primary_layer' must be block indices in [-4, 3]"),
        ({"analysis": {"layer": 4}}, "'analysis.layer' must be block indices in [-4, 3]"),
        ({"extract": {"layers": [0, 7]}}, "'extract.layers' must be block indices in [-4, 3]"),
        ({"marker": {"sources": []}}, "'marker.sources' must be 'all' or a non-empty list"),
    ],
)
def test_a_study_config_that_cannot_finish_fails_before_any_work(tiny_qwen_path, tmp_path, capsys, monkeypatch, override, fragment):
    import yaml

    import persona_geometry.models
    from persona_geometry.pipeline.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load before the config is checked")

    monkeypatch.setattr(persona_geometry.models, "load_model", no_loading)
    data = {"name": "early", "out": str(tmp_path / "out"), "model": {"name": str(tiny_qwen_path), "device": "cpu"}, **override}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    status = main(["run", str(tmp_path / "study.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_extract_reads_the_persona_and_question_files_before_loading_the_model(tiny_qwen_path, tmp_path, capsys, monkeypatch):
    import persona_geometry.models
    from persona_geometry.pipeline.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load before the inputs are read")

    monkeypatch.setattr(persona_geometry.models, "load_model", no_loading)
    (tmp_path / "personas.yaml").write_text("personas: [")
    status = main(["extract", "--model", str(tiny_qwen_path), "--personas", str(tmp_path / "personas.yaml"), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "personas.yaml" in err[0], err
