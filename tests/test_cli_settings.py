"""The command line reads every setting from the config dataclasses, and keeps its habits.

Defaults, types and allowed values are declared once (``persona_geometry.settings.setting``);
these tests check the parser against the dataclasses themselves, so a default restated by hand
or a list of choices copied into the CLI cannot come back unnoticed.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from importlib import metadata

import pytest

from persona_geometry import settings
from persona_geometry.pipeline.cli import build_parser, main
from persona_geometry.pipeline.config import (
    AnalysisConfig,
    EvalConfig,
    ExtractConfig,
    ModelConfig,
    StudyConfig,
)
from persona_geometry.training.data import MarkerDataConfig, MarkerDataRecipe
from persona_geometry.training.lora import MarkerTrainConfig


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _parse(command: str, *argv: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *argv])


def test_help_and_version_import_no_torch():
    # --help must be instant: building the parser, and printing help, load no torch (nor scipy).
    code = (
        "import sys\n"
        "from persona_geometry.pipeline.cli import build_parser, main\n"
        "build_parser()\n"
        "try:\n    main(['train-marker', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'scipy', 'transformers', 'pandas') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"persona-geometry {metadata.version('persona-geometry')}"


def test_every_option_has_help_showing_its_default():
    for name, p in _subparsers().items():
        formatter = p._get_formatter()
        for action in _options(p):
            text = formatter._get_help_string(action)
            assert action.help, f"{name} {action.option_strings} has no help"
            if not action.required and action.default not in (None, False, argparse.SUPPRESS):
                assert "(default" in text, f"{name} {action.option_strings}: {text!r}"


def test_one_list_syntax_everywhere():
    # Lists are `a,b`; no option takes several space-separated values.
    for name, p in _subparsers().items():
        for action in _options(p):
            assert action.nargs in (None, 0, "?"), (name, action.option_strings)
    args = _parse("extract", "--model", "m", "--out", "o", "--layers", "1,-1", "--hooks", "resid_post,resid_pre")
    assert args.layers == (1, -1) and args.hooks == ("resid_post", "resid_pre")


def test_layer_is_a_block_index_in_every_command():
    for name, p in _subparsers().items():
        for action in _options(p):
            if "--layer" in action.option_strings:
                assert action.type is int, name
            if "--layers" in action.option_strings:
                assert _parse(name, *_required(name), "--layers", "3,-1").layers == (3, -1)


def _required(command: str) -> list[str]:
    return {"extract": ["--model", "m", "--out", "o"]}.get(command, [])


@pytest.mark.parametrize(
    ("command", "argv", "cls", "base"),
    [
        ("train-marker", ["--model", "m", "--data", "d", "--out", "o"], MarkerTrainConfig, {}),
        ("make-data", ["--source", "villain", "--responses", "r", "--out", "o"], MarkerDataConfig, {"source": "villain"}),
        ("eval-marker", ["--model", "m", "--out", "o"], EvalConfig, {}),
        ("extract", ["--model", "m", "--out", "o"], ExtractConfig, {}),
    ],
)
def test_cli_defaults_are_the_config_defaults(command, argv, cls, base):
    args = _parse(command, *argv)
    fields = [f.name for f in dataclasses.fields(cls)]
    assert cls(**{name: getattr(args, name) for name in fields}) == cls(**base)


def test_cli_choices_are_the_settings_tuples():
    expected = {
        ("extract", "--engine"): settings.ENGINES,
        ("extract", "--dtype"): settings.DTYPES,
        ("eval-marker", "--backend"): settings.BACKENDS,
        ("eval-marker", "--dtype"): settings.DTYPES,
        ("make-data", "--backend"): settings.BACKENDS,
        ("make-data", "--dtype"): settings.DTYPES,
        ("train-marker", "--dtype"): settings.TRAIN_DTYPES,
        ("train-marker", "--report-to"): settings.REPORT_TO,
        ("sweep", "--statistic"): settings.STATISTICS,
        ("compare", "--statistic"): settings.STATISTICS,
        ("compare", "--method-re"): settings.META_METHODS,
        ("sweep", "--layout"): settings.TABLE_LAYOUTS,
        ("run", "--dtype"): settings.DTYPES,
    }
    found = {}
    for name, p in _subparsers().items():
        for action in _options(p):
            for flag in action.option_strings:
                if (name, flag) in expected:
                    found[name, flag] = tuple(action.choices)
    assert found == expected


def test_sweep_and_analysis_settings_come_from_the_study_config():
    args = _parse("sweep", "t.csv")
    defaults = AnalysisConfig()
    for name in ("primary_layer", "statistic", "n_permutations", "n_bootstrap", "seed"):
        assert getattr(args, name) == getattr(defaults, name)
    assert _parse("sweep", "t.csv", "--permutations", "7").n_permutations == 7


def test_study_sections_reuse_the_library_configs():
    config = StudyConfig(model=ModelConfig(name="m"))
    # One recipe, not a copy: a study's data section is the training package's recipe, and each
    # source's config is that recipe plus the source.
    assert type(config.data) is MarkerDataRecipe
    assert config.data.for_source("villain") == MarkerDataConfig(source="villain")
    # The eval section is SamplingSettings plus the eval's own fields.
    from persona_geometry.sampling import SamplingSettings

    assert config.eval.sampling() == SamplingSettings()


def test_bad_choice_in_a_list_setting_is_one_line(capsys):
    assert main(["extract", "--model", "m", "--out", "o", "--hooks", "resid_post,nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'hooks' parameter of ExtractConfig" in err and "nonsense" in err


def _rate_table(tmp_path, scale):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    x = np.linspace(-0.5, 0.5, 8)
    rate = np.clip(0.25 - 0.4 * x + rng.normal(0, 0.03, 8), 0.01, 0.99)
    frame = pd.DataFrame({"persona": [f"p{i}" for i in range(8)], "cos_l3": x, "rate_pct": np.round(rate * scale, 3)})
    frame["cos_l4"] = frame.cos_l3 * 0.5 + 0.1
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("command", ["analyze", "sweep"])
def test_rates_outside_0_1_are_refused(tmp_path, capsys, command):
    # Percentages (3-47) in a column of rates would write rates of 3.0 into JSON that says fractions.
    path = _rate_table(tmp_path, 100)
    extra = ["--x", "cos_l3"] if command == "analyze" else ["--permutations", "0", "--bootstrap", "0"]
    assert main([command, str(path), "--rate", "rate_pct", *extra, "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "rates in [0, 1]" in err and "'rate_pct'" in err
    assert not (tmp_path / "o.json").exists()
    # The same table as fractions runs, and lists the file it wrote.
    path = _rate_table(tmp_path, 1)
    assert main([command, str(path), "--rate", "rate_pct", *extra, "--json", str(tmp_path / "o.json")]) == 0
    assert f"wrote:\n  {tmp_path / 'o.json'}" in capsys.readouterr().out


def test_api_defaults_are_the_settings_defaults():
    import inspect

    from persona_geometry.analysis.report import sweep_table
    from persona_geometry.analysis.sweep import layer_sweep
    from persona_geometry.eval import source_rates
    from persona_geometry.sampling import SamplingSettings, generate_completions
    from persona_geometry.training import generate_responses

    def defaults(func):
        return {k: p.default for k, p in inspect.signature(func).parameters.items() if p.default is not inspect.Parameter.empty}

    # The eval section is SamplingSettings plus back end, regex and batch size: every function that
    # samples takes the same defaults for the settings it shares with it.
    evaluation, analysis = EvalConfig(), AnalysisConfig()
    shared = {f.name for f in dataclasses.fields(EvalConfig)} - {"n_completions"}
    for func in (source_rates, generate_responses, generate_completions):
        given = defaults(func)
        assert given.get("n_completions", SamplingSettings.n_completions) == evaluation.n_completions
        for name in shared & set(given):
            assert given[name] == getattr(evaluation, name), (func.__name__, name)
    for func in (layer_sweep, sweep_table):
        for name in ("n_permutations", "n_bootstrap", "statistic", "seed", "primary_layer"):
            assert defaults(func)[name] == getattr(analysis, name), (func.__name__, name)


def test_hand_written_options_default_to_the_library_functions():
    # Options that map to a library function's keyword (not a config field) take its default.
    import inspect

    from persona_geometry.analysis import compare_studies
    from persona_geometry.analysis.report import sweep_table

    def defaults(func):
        return {k: p.default for k, p in inspect.signature(func).parameters.items() if p.default is not inspect.Parameter.empty}

    compare = _parse("compare", "a", "b")
    for name in ("depth", "statistic", "intersect", "method_re", "alpha"):
        assert getattr(compare, name) == defaults(compare_studies)[name], name
    sweep = _parse("sweep", "t.csv")
    given = defaults(sweep_table)
    assert (sweep.persona, sweep.layout, sweep.layer_column, sweep.cosine) == (given["persona"], given["layout"], given["layer"], given["cosine"])

