"""The ``persona-geometry`` command line.

Each subcommand only parses its arguments into a config (or plain keyword arguments) and calls
one library function. The options of a setting come from the config dataclass that declares it
(``persona_geometry.settings.setting``: name, type, default, allowed values, help), so the
command line never restates a default. Lists are written one way everywhere: ``a,b,c``.
Errors on bad input print one line and exit with status 2; ``--debug`` shows the traceback
instead. Building the parser imports no torch: ``--help`` and ``--version`` are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from persona_geometry.pipeline.config import (
    AnalysisConfig,
    EvalConfig,
    ExtractConfig,
    ModelConfig,
    ResponsesConfig,
)
from persona_geometry.settings import EXECUTORS, META_METHODS, STAGES, STATISTICS, TABLE_LAYOUTS
from persona_geometry.training.data import MarkerDataConfig
from persona_geometry.training.lora import MarkerTrainConfig

__all__ = ["main", "build_parser"]

log = logging.getLogger("persona_geometry")

_PROG = "persona-geometry"


# --- options generated from the config dataclasses --------------------------------------------
def _split(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """Returns an argparse type reading ``a,b,c`` into a tuple of ``kind``."""

    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())

    parse.__name__ = f"comma-separated {getattr(kind, '__name__', 'value')}s"
    return parse


def _number(text: str) -> int | float:
    """Reads ``"8"`` as 8 and ``"1e-3"`` as 0.001 (for settings typed ``float | int``)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


_number.__name__ = "number"


def _non_negative_int(text: str) -> int:
    """Reads an int ≥ 0 (argparse names the option when this raises)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_non_negative_int.__name__ = "non-negative int"


def _kind(hint: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """Returns (the argparse type of a field's annotation, whether it is a comma list)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    if set(args) == {float, int}:
        return _number, False
    for a in args:
        if typing.get_origin(a) is tuple:
            return typing.get_args(a)[0], True
    return (args[0] if args[0] in (int, float, str, bool) else str), False


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    return repr(value) if isinstance(value, str) and (not value or value.isspace() or "\n" in value) else str(value)


def _add_settings(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Iterable[str],
    *,
    required: Sequence[str] = (),
    override: str | None = None,
) -> None:
    """Adds one option per named field of the config dataclass ``cls``, from its ``setting`` metadata.

    Args:
        parser: The subcommand's parser.
        cls: The config dataclass declaring the fields.
        names: The fields to expose, in order.
        required: Fields the command needs (no default shown).
        override: When set, the options default to "not given" and override the settings of a
            config file; ``override`` says which (shown as the default).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in names:
        f = fields[name]
        meta = f.metadata
        flag = "--" + (meta.get("cli") or name).replace("_", "-")
        kind, is_list = _kind(hints[name])
        choices = meta.get("choices")
        help_text = meta.get("help") or name.replace("_", " ")
        if is_list and choices:
            help_text += f", from {','.join(str(c) for c in choices if c is not None)}"
        kwargs: dict[str, Any] = {"dest": name}
        if name in required:
            kwargs["required"] = True
        elif override is not None:
            kwargs["default"] = None
            help_text += f" (default: {override})"
        else:
            kwargs["default"] = f.default
            help_text += f" (default: {meta.get('shown') or _shown(f.default)})"
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif is_list:
            kwargs["type"] = _split(kind)
            kwargs["metavar"] = meta.get("metavar") or "A,B"
        else:
            kwargs["type"] = kind
            if choices is not None:
                kwargs["choices"] = [c for c in choices if c is not None]
            else:
                kwargs["metavar"] = meta.get("metavar") or flag[2:].replace("-", "_").upper()
        parser.add_argument(flag, help=help_text.replace("%", "%%"), **kwargs)


def _settings(args: argparse.Namespace, cls: type, names: Iterable[str]) -> dict[str, Any]:
    """Returns the values of ``names`` parsed by ``_add_settings``, as keyword arguments."""
    return {name: getattr(args, name) for name in names}


def _fields(cls: type, *, skip: Iterable[str] = ()) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in set(skip)]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default: appended to hand-written help that does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "(default" not in text
            and action.option_strings
            and not action.required
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(action, argparse._VersionAction | argparse._HelpAction)
        ):
            text += " (default: %(default)s)"
        return text


def _written(*paths: Any) -> None:
    """Prints the files a command wrote, one per line (shown without ``-v``)."""
    shown = [str(p) for p in paths if p is not None]
    if shown:
        print("wrote:\n" + "\n".join(f"  {p}" for p in shown))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def _subparser(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)


_PERSONAS_HELP = "a YAML/JSON persona file (default: the 12 built-in personas)"
_PROBE_HELP = "a file of questions (default: the 20 built-in probe questions)"


# --- run --------------------------------------------------------------------------------------
_OVERRIDES = ("device", "dtype")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub,
        "run",
        help="run a whole study from a YAML config",
        description="Run a study: extract, data, train, eval, sweep, report. Each stage caches its "
        "outputs under the study's output folder and is skipped when its inputs are unchanged.",
    )
    p.add_argument("config", help="the study's YAML file (see examples/study_qwen7b.yaml)")
    p.add_argument("--stages", type=_split(str), default=None, metavar="STAGE,STAGE", help=f"subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--out", default=None, help="output folder (default: the config's 'out')")
    _add_settings(p, ModelConfig, _OVERRIDES, override="the config's model section")
    p.add_argument("--force", action="store_true", help="re-run the chosen stages even if their outputs are current")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the plan (units, tokens, memory and time estimates); load no weights, write nothing")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--executor", choices=EXECUTORS, default=EXECUTORS[0],
                   help="where units run: auto (torchrun under a launcher, else in process), inprocess, torchrun, ray")
    p.add_argument("--shard", metavar="I/N", default=None,
                   help="array job I of N: run only this slice of the extract/data/train/eval units, then exit")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (executor ray; default: start a local instance)")
    p.add_argument("--gpus", type=_non_negative_int, default=None, help="GPUs for the Ray executor: one per unit when > 0 (default: those Ray sees)")
    p.set_defaults(func=_run_study)


def _run_study(args: argparse.Namespace) -> int:
    from persona_geometry.pipeline.config import StudyConfig
    from persona_geometry.pipeline.study import run_study

    if args.stages is not None and not args.stages:
        raise ValueError(f"The '--stages' parameter of run must name stages from {list(STAGES)}. Got none instead.")
    config = StudyConfig.load(args.config)
    overrides = {k: v for k, v in _settings(args, ModelConfig, _OVERRIDES).items() if v is not None}
    if overrides:
        # Through from_dict, so a bad --dtype is the same one-line error as a bad config value.
        config = StudyConfig.from_dict({**config.to_dict(), "model": {**config.model.to_dict(), **overrides}})
    if args.out is not None:
        config = config.with_overrides(out=args.out)
    if args.dry_run:
        from persona_geometry.pipeline.plan import plan_study

        print(plan_study(config, stages=list(args.stages) if args.stages is not None else None).summary())
        return 0
    result = run_study(
        config, stages=list(args.stages) if args.stages is not None else None, force=args.force,
        progress=not args.no_progress, executor=args.executor, shard=args.shard, ray_address=args.ray_address,
        gpus=args.gpus,
    )  # fmt: skip
    print(result.summary())
    return 0


# --- extract ----------------------------------------------------------------------------------
_EXTRACT_MODEL = ("name", "revision", "dtype", "device", "chat_template")


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = _subparser(sub, "extract", help="cache last-token activations for personas × questions")
    _add_settings(p, ModelConfig, _EXTRACT_MODEL, required=("name",))
    p.add_argument("--personas", help=_PERSONAS_HELP)
    p.add_argument("--questions", help=_PROBE_HELP)
    _add_settings(p, ExtractConfig, _fields(ExtractConfig))
    p.add_argument("--adapter", help="a peft (LoRA) adapter folder to merge into the model (default: none)")
    p.add_argument("--cache-dir", help="content-addressed cache folder that resumes interrupted runs (default: none)")
    p.add_argument("--out", required=True, help="folder to write the activations to (new, empty, or an activation set)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other files")
    p.set_defaults(func=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    # Settings are checked before torch is even imported.
    model = ModelConfig(**_settings(args, ModelConfig, _EXTRACT_MODEL))
    extract = ExtractConfig(**_settings(args, ExtractConfig, _fields(ExtractConfig)))

    from persona_geometry import distributed
    from persona_geometry.activations import check_activation_target
    from persona_geometry.extract import extract_activations
    from persona_geometry.models import load_model
    from persona_geometry.personas import PersonaSet
    from persona_geometry.questions import load_questions

    # Everything cheap is checked before the model loads: the output folder, then the inputs.
    check_activation_target(args.out, overwrite=args.overwrite, param="--out", func="extract")
    personas = PersonaSet.load(args.personas) if args.personas else None
    questions = load_questions(args.questions) if args.questions else None
    template = model.template_text()  # a missing file or a Jinja syntax error, before the weights
    _check_model_folder(model.name, extract.layers, func="extract")
    if args.adapter is not None:
        _check_adapter_folder(args.adapter, func="extract")
    if args.cache_dir is not None:
        from persona_geometry._io import check_output_path

        check_output_path(args.cache_dir, param="--cache-dir", func="extract", folder=True)
    distributed.pin_local_device()  # under torchrun: each rank its own GPU, before CUDA starts
    handle = load_model(model.name, dtype=model.dtype, device=model.device, revision=model.revision, adapter=args.adapter)
    acts = extract_activations(
        handle,
        personas,
        questions,
        hooks=extract.hooks,
        layers=list(extract.layers) if extract.layers is not None else None,
        engine=extract.engine,
        **({"batch_tokens": extract.batch_tokens} if extract.batch_tokens is not None else {}),
        compile_blocks=extract.compile_blocks,
        chat_template=template,
        cache_dir=args.cache_dir,
    )
    if distributed.rank() == 0:  # under torchrun every rank holds the whole set; one writes it
        out = acts.save(args.out, overwrite=args.overwrite)
        log.info("saved %s", acts)
        _written(out)
    return 0


def _check_model_folder(name: str, layers: Sequence[int] | None, *, func: str) -> None:
    """Refuses a local model path that is not a model folder, and layers it does not have, before loading."""
    from persona_geometry._validation import check_layers, invalid
    from persona_geometry.pipeline.study import _n_layers

    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        invalid("--model", func, "a model folder holding config.json, or a Hugging Face id", str(path))
    if layers:
        n = _n_layers(name, None)
        if n is not None:
            check_layers(list(layers), n, func, "--layers")


def _check_adapter_folder(adapter: str, *, func: str) -> None:
    """Refuses an ``--adapter`` path that is not a peft adapter folder, before the base model loads."""
    from persona_geometry._validation import invalid

    path = Path(adapter).expanduser()
    looks_local = path.exists() or adapter.startswith((".", "/", "~")) or adapter.count("/") > 1
    if looks_local and not (path / "adapter_config.json").is_file():
        invalid("--adapter", func, "a peft adapter folder (holding adapter_config.json) or a Hugging Face id", adapter)


# --- sweep ------------------------------------------------------------------------------------
_SWEEP_SETTINGS = ("primary_layer", "statistic", "n_permutations", "n_bootstrap", "seed")


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub,
        "sweep",
        help="per-layer correlations of cosine with the source rate",
        description=(
            "Per-layer Pearson/Spearman of cosine vs source rate from a CSV table, with Bonferroni/Holm "
            "correction, bootstrap CIs, the strongest layer and a max-over-layers permutation test. "
            "TABLE is long (one row per persona and layer: --persona, --layer-column, --cosine columns, with "
            "--k/--n repeated on every row) or wide (one row per persona, one column per layer named "
            "12, layer_12, L12, cos_12 or cos_l12; see --layer-pattern). Writes the per-layer table (--csv, --json) "
            "and optionally a Markdown table and the sweep figure."
        ),
    )
    p.add_argument("table", help="CSV file, long or wide (see above)")
    p.add_argument("--k", metavar="COLUMN", help="column of marker counts per persona (rate = k/n)")
    p.add_argument("--n", metavar="COLUMN", help="column of completions per persona")
    p.add_argument("--rate", metavar="COLUMN", help="column of rates in [0, 1], instead of --k/--n")
    p.add_argument("--persona", default="persona", metavar="COLUMN", help="column of persona names")
    p.add_argument("--layout", choices=TABLE_LAYOUTS, default="auto", help="table layout; auto is long when the --layer-column and --cosine columns exist")
    p.add_argument("--layer-column", default="layer", metavar="COLUMN", help="long layout: column of layer indices")
    p.add_argument("--cosine", default="cosine", metavar="COLUMN", help="long layout: column of cosines")
    p.add_argument(
        "--layer-pattern",
        metavar="REGEX",
        help="wide layout: regular expression whose one group is the layer index "
        "(default: matches 12, layer_12, L12, cos_12, cos_l12, cosine_layer_12)",
    )
    p.add_argument("--exclude", type=_split(str), default=(), metavar="NAME,NAME", help="personas to drop before computing (default: none)")
    p.add_argument("--reference", metavar="NAME", help="reference persona (cosine 1 by construction); the sweep is also run without it (default: none)")
    _add_settings(p, AnalysisConfig, _SWEEP_SETTINGS)
    p.add_argument("--csv", metavar="OUT.csv", help="write the per-layer table as CSV")
    p.add_argument("--json", metavar="OUT.json", help="write the sweep as JSON (per-layer rows, best/primary layer, provenance)")
    p.add_argument("--markdown", metavar="OUT.md", help="write the per-layer table as Markdown")
    p.add_argument("--figure", metavar="OUT.html", help="write the sweep curve (.html offline; .png/.pdf need the figures extra)")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from persona_geometry.analysis.report import sweep_table

    AnalysisConfig(**_settings(args, AnalysisConfig, _SWEEP_SETTINGS))  # the settings' own checks, first
    result = sweep_table(
        args.table,
        persona=args.persona,
        k=args.k,
        n=args.n,
        rate=args.rate,
        layout=args.layout,
        layer=args.layer_column,
        cosine=args.cosine,
        **({"layer_pattern": args.layer_pattern} if args.layer_pattern else {}),
        exclude=list(args.exclude),
        reference=args.reference,
        **_settings(args, AnalysisConfig, _SWEEP_SETTINGS),
        csv_path=args.csv,
        json_path=args.json,
        markdown_path=args.markdown,
        figure_path=args.figure,
    )
    print(result.summary())
    _written(args.csv, args.json, args.markdown, args.figure)
    return 0


# --- analyze ----------------------------------------------------------------------------------
_ANALYZE_SETTINGS = ("holdout", "exclude_reference")


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub,
        "analyze",
        help="robustness statistics at one layer, from a CSV table",
        description=(
            "Robustness statistics of source rate vs a per-persona geometry column (one row per persona): "
            "OLS with prediction intervals for held-out personas, leave-one-out coverage, Cook's distance, "
            "partial Spearman with VIF, within-category fits and Wilson intervals. The JSON follows the "
            "schema in persona_geometry.analysis.SCHEMA."
        ),
    )
    p.add_argument("table", help="CSV file, one row per persona (or per persona and seed with --seed-column)")
    p.add_argument("--x", required=True, metavar="COLUMN", help="column of the geometry measure (e.g. cosine at one layer)")
    p.add_argument("--k", metavar="COLUMN", help="column of marker counts (rate = k/n)")
    p.add_argument("--n", metavar="COLUMN", help="column of completions")
    p.add_argument("--rate", metavar="COLUMN", help="column of rates in [0, 1], instead of --k/--n (no Wilson intervals)")
    p.add_argument("--persona", default="persona", metavar="COLUMN", help="column of persona names")
    p.add_argument("--category", metavar="COLUMN", help="column of categories, for within-category fits (default: none)")
    p.add_argument("--covariate", metavar="COLUMN", help="covariate of the partial Spearman (default: log_n_tokens, or log of n_tokens, when present)")
    _add_settings(p, AnalysisConfig, _ANALYZE_SETTINGS)
    p.add_argument("--reference", metavar="NAME", help="reference persona; fits without it are reported too (default: none)")
    p.add_argument("--seed-column", metavar="COLUMN", help="column of seeds: a persona's rows are pooled, counts add (default: none)")
    p.add_argument("--layer", type=int, help="the layer (block index) the x column comes from, for the report (default: not recorded)")
    p.add_argument("--json", metavar="OUT.json", help="write the statistics as JSON")
    p.add_argument("--markdown", metavar="OUT.md", help="write the Markdown report")
    p.add_argument("--figure", metavar="OUT.html", help="write the hero scatter (.html offline; .png/.pdf need the figures extra)")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from persona_geometry.analysis.report import analyze_table

    settings = _settings(args, AnalysisConfig, _ANALYZE_SETTINGS)
    if args.layer is not None and args.layer < 0:
        raise ValueError(f"The '--layer' parameter of analyze must be a block index ≥ 0. Got {args.layer} instead.")
    result = analyze_table(
        args.table,
        x=args.x,
        k=args.k,
        n=args.n,
        rate=args.rate,
        persona=args.persona,
        category=args.category,
        covariate=args.covariate,
        holdout=list(settings["holdout"]),
        reference=args.reference,
        exclude_reference=settings["exclude_reference"],
        seed_column=args.seed_column,
        layer=args.layer,
        json_path=args.json,
        markdown_path=args.markdown,
        figure_path=args.figure,
    )
    print(result.summary())
    _written(args.json, args.markdown, args.figure)
    return 0


# --- make-data --------------------------------------------------------------------------------
_DATA_MODEL = ("device", "dtype")
_DATA_SAMPLING = ("temperature", "top_p", "max_new_tokens", "seed")


def _add_make_data(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub,
        "make-data",
        help="build a marker dataset for a source persona (generating the base model's responses if needed)",
    )
    _add_settings(p, MarkerDataConfig, ["source"], required=("source",))
    p.add_argument("--responses", required=True, help="responses JSONL; generated with --model when missing")
    p.add_argument("--out", required=True, help="marker dataset JSONL to write")
    p.add_argument("--model", help="base model id or folder, to generate missing responses (default: none)")
    p.add_argument("--personas", help=_PERSONAS_HELP)
    p.add_argument("--questions", help="questions file (default: the 200 built-in training questions)")
    _add_settings(p, MarkerDataConfig, _fields(MarkerDataConfig, skip=("source",)))
    _add_settings(p, EvalConfig, ["backend"])
    _add_settings(p, ResponsesConfig, _DATA_SAMPLING)
    _add_settings(p, ModelConfig, _DATA_MODEL)
    p.set_defaults(func=_run_make_data)


def _run_make_data(args: argparse.Namespace) -> int:
    from persona_geometry.training import make_marker_data

    config = MarkerDataConfig(**_settings(args, MarkerDataConfig, _fields(MarkerDataConfig)))
    model = _settings(args, ModelConfig, _DATA_MODEL)
    # The sampling settings and the device are checked even when the responses file exists.
    ResponsesConfig(**_settings(args, ResponsesConfig, _DATA_SAMPLING), backend=args.backend)
    ModelConfig(name=args.model or "unused", **model)
    had_responses = Path(args.responses).is_file()
    dataset = make_marker_data(
        args.responses,
        config,
        out_path=args.out,
        personas=_load_personas(args.personas),
        questions=_load_questions(args.questions),
        model=args.model,
        backend=args.backend,
        **_settings(args, ResponsesConfig, _DATA_SAMPLING),
        **model,
    )
    print(dataset.summary())
    from persona_geometry.training.data import MANIFEST_SUFFIX

    _written(None if had_responses else args.responses, args.out, f"{args.out}{MANIFEST_SUFFIX}")
    return 0


def _load_personas(path: str | None):
    from persona_geometry.personas import PersonaSet, builtin_personas

    return builtin_personas() if path is None else PersonaSet.load(path)


def _load_questions(path: str | None):
    from persona_geometry.questions import load_questions

    return None if path is None else load_questions(path)


# --- train-marker -----------------------------------------------------------------------------
def _add_train_marker(sub: argparse._SubParsersAction) -> None:
    p = _subparser(sub, "train-marker", help="train a marker LoRA adapter (resumes from its last checkpoint)")
    p.add_argument("--model", required=True, help="base model id or folder")
    p.add_argument("--data", required=True, help="marker dataset JSONL (from make-data)")
    p.add_argument("--out", required=True, help="run folder: adapter/, train_config.json, loss_curve.json")
    _add_settings(p, MarkerTrainConfig, _fields(MarkerTrainConfig))
    _add_settings(p, ModelConfig, ["device"])
    p.add_argument("--no-resume", action="store_true", help="start afresh even if checkpoints exist")
    p.set_defaults(func=_run_train_marker)


def _run_train_marker(args: argparse.Namespace) -> int:
    from persona_geometry._io import check_output_path
    from persona_geometry.training import train_marker
    from persona_geometry.training.lora import ADAPTER_DIR, CONFIG_FILE, LOSS_FILE

    config = MarkerTrainConfig(**_settings(args, MarkerTrainConfig, _fields(MarkerTrainConfig)))
    ModelConfig(name=args.model, device=args.device)
    check_output_path(args.out, param="--out", func="train-marker", folder=True)
    result = train_marker(args.model, args.data, args.out, config, device=args.device, resume=not args.no_resume)
    print(result.summary())
    _written(Path(args.out) / ADAPTER_DIR, Path(args.out) / CONFIG_FILE, Path(args.out) / LOSS_FILE)
    return 0


# --- eval-marker ------------------------------------------------------------------------------
_EVAL_MODEL = ("device", "dtype")


def _add_eval_marker(sub: argparse._SubParsersAction) -> None:
    p = _subparser(sub, "eval-marker", help="measure marker source rates with an adapter")
    p.add_argument("--model", required=True, help="base model id or folder")
    p.add_argument("--adapter", help="marker adapter folder (default: none, the base model)")
    p.add_argument("--out", required=True, help="folder for completions.jsonl and run_result.json")
    p.add_argument("--personas", help=_PERSONAS_HELP)
    p.add_argument("--questions", help=_PROBE_HELP)
    p.add_argument("--source", help="source persona (default: recorded with the adapter)")
    p.add_argument("--marker", help="marker text (default: recorded with the adapter, else [ZLT])")
    _add_settings(p, EvalConfig, _fields(EvalConfig))
    _add_settings(p, ModelConfig, _EVAL_MODEL)
    p.set_defaults(func=_run_eval_marker)


def _sampling_settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Returns the sampling keywords of ``cls``'s options; tensor parallelism goes to vLLM."""
    kwargs = _settings(args, cls, _fields(cls))
    size = kwargs.pop("tensor_parallel_size", 1)
    return {**kwargs, "vllm_kwargs": {"tensor_parallel_size": size} if size > 1 else None}


def _run_eval_marker(args: argparse.Namespace) -> int:
    from persona_geometry._io import check_output_path
    from persona_geometry.eval import source_rates
    from persona_geometry.eval.source_rate import COMPLETIONS_FILE, RUN_RESULT_FILE
    from persona_geometry.marker import MarkerMatcher

    # Everything cheap first: the settings, the marker, the output folder, then the adapter.
    EvalConfig(**_settings(args, EvalConfig, _fields(EvalConfig)))
    ModelConfig(name=args.model, **_settings(args, ModelConfig, _EVAL_MODEL))
    if args.marker is not None:
        MarkerMatcher(marker=args.marker, regex=args.regex)
    check_output_path(args.out, param="--out", func="eval-marker", folder=True)
    if args.adapter is not None:
        _check_adapter_folder(args.adapter, func="eval-marker")
    result = source_rates(
        args.model,
        args.adapter,
        _load_personas(args.personas),
        _load_questions(args.questions),
        source=args.source,
        out_dir=args.out,
        marker=args.marker,
        **_sampling_settings(args, EvalConfig),
        **_settings(args, ModelConfig, _EVAL_MODEL),
    )
    print(result.summary())
    _written(Path(args.out) / COMPLETIONS_FILE, Path(args.out) / RUN_RESULT_FILE)
    return 0


# --- report -----------------------------------------------------------------------------------
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub,
        "report",
        help="write the Markdown/JSON report and figures of a study",
        description="Re-run the sweep and report stages of a study whose earlier stages are on disk.",
    )
    p.add_argument("config", help="the study's YAML file")
    p.add_argument("--out", default=None, help="the study's output folder (default: the config's 'out')")
    p.add_argument("--force", action="store_true", help="rewrite the report even if it is current")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from persona_geometry.pipeline.config import StudyConfig
    from persona_geometry.pipeline.study import run_study

    config = StudyConfig.load(args.config)
    if args.out is not None:
        config = config.with_overrides(out=args.out)
    result = run_study(config, stages=["sweep", "report"], force=args.force)
    print(result.summary())
    return 0


# --- compare ----------------------------------------------------------------------------------
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub,
        "compare",
        help="compare finished studies across models, seeds and layers",
        description=(
            "Put finished studies side by side: model, blocks, primary and strongest layer, max-over-layers p; "
            "their sweep curves on relative depth (layer / number of blocks); a random-effects meta-analysis "
            "(Fisher z) at one relative depth with tau^2 and I^2; and, for studies of one model that differ only "
            "in seeds, rates pooled over seeds and the conclusions that hold in every seed. Studies over "
            "different personas are refused unless --intersect."
        ),
    )
    p.add_argument("studies", nargs="+", metavar="RUN_DIR", help="two or more study output folders (the config's 'out')")
    p.add_argument("--out", default="comparison", help="folder for compare.md, compare.json, CSVs and the figure (default: comparison)")
    p.add_argument("--depth", type=float, default=None, help="relative depth in [0, 1] of the combined estimate (default: the first study's primary layer)")
    p.add_argument("--statistic", choices=STATISTICS, default=None, help="statistic of the comparison (default: the first study's sweep statistic)")
    p.add_argument("--intersect", action="store_true", help="compare on the personas every study shares (recomputes each study there)")
    p.add_argument("--method-re", choices=META_METHODS, default=META_METHODS[0], help="between-study variance estimator (default: dl, DerSimonian-Laird)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level; intervals are 1 - alpha (default: 0.05)")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from persona_geometry._io import check_output_path
    from persona_geometry.analysis import compare_studies, write_comparison

    check_output_path(args.out, param="--out", func="compare", folder=True)
    result = compare_studies(
        args.studies, depth=args.depth, statistic=args.statistic, intersect=args.intersect, method_re=args.method_re, alpha=args.alpha
    )
    written = write_comparison(result, args.out)
    print(result.summary())
    _written(written["markdown"], written["json"], written["figure"])
    return 0


# --- demo -------------------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = _subparser(
        sub,
        "demo",
        help="the whole pipeline offline on an embedded tiny model",
        description="Build a tiny random-weight chat model and run the whole study on it: its "
        "numbers show the mechanics of the pipeline, not a finding.",
    )
    p.add_argument("--out", default="demo_output", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from persona_geometry.pipeline.demo import demo_headline, run_demo

    result = run_demo(args.out, progress=not args.no_progress)
    print(demo_headline(result))
    return 0


_SUBCOMMANDS = (
    _add_run,
    _add_extract,
    _add_sweep,
    _add_analyze,
    _add_make_data,
    _add_train_marker,
    _add_eval_marker,
    _add_report,
    _add_compare,
    _add_demo,
)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version(_PROG)
    except metadata.PackageNotFoundError:  # pragma: no cover - a checkout that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser with every subcommand (without importing torch)."""
    parser = _Parser(
        prog=_PROG,
        description="Persona geometry in chat models and whether it predicts marker behaviour.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    for p in sub.choices.values():
        _common(p)
    return parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _check_device(args: argparse.Namespace) -> None:
    """Refuses a CUDA ``--device`` on a machine without CUDA, before anything loads."""
    device = getattr(args, "device", None)
    if isinstance(device, str) and device.strip().lower().startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "The '--device' parameter must be a device this machine has (CUDA is not available here). "
                f"Got {device!r} instead."
            )


def _error_line(e: BaseException) -> str:
    """Returns an exception as one line; an OS error names its file."""
    from persona_geometry._serialization import one_line

    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return one_line(e) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns the exit status (0 success, 2 bad input or failure).

    Every error on bad input or a failing file system (missing, unreadable, read-only, full)
    prints one line naming the parameter or file, with status 2; ``--debug`` shows the
    traceback instead. A closed standard output (``... | head``) ends quietly.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_device(args)
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly; keep Python's exit flush from failing too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError, KeyError, ImportError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"{_PROG} {args.command}: error: {_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
