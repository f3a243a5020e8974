"""The ``persona-geometry`` command line.

Each subcommand only parses its arguments into a config (or plain keyword arguments) and calls
one library function. Errors on bad input print one line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("persona_geometry")


class UsageError(ValueError):
    """A bad command-line value; reported as one line with exit status 2."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


# --- run --------------------------------------------------------------------------------------
def _add_run(sub: argparse._SubParsersAction) -> None:
    from persona_geometry.pipeline.study import STAGES

    p = sub.add_parser(
        "run",
        help="run a whole study from a YAML config",
        description="Run a study: extract, data, train, eval, sweep, report. Each stage caches its "
        "outputs under the study's output folder and is skipped when its inputs are unchanged.",
    )
    p.add_argument("config", help="the study's YAML file (see examples/study_qwen7b.yaml)")
    p.add_argument("--stages", type=_names, default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--out", default=None, help="output folder (overrides the config's 'out')")
    p.add_argument("--device", default=None, help="torch device (overrides model.device)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (overrides model.dtype)")
    p.add_argument("--force", action="store_true", help="re-run the chosen stages even if their outputs are current")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_study)


def _run_study(args: argparse.Namespace) -> int:

    from persona_geometry.pipeline.config import StudyConfig
    from persona_geometry.pipeline.study import run_study

    config = StudyConfig.load(args.config)
    overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    if overrides:
        # Through from_dict, so a bad --dtype is the same one-line error as a bad config value.
        config = StudyConfig.from_dict({**config.to_dict(), "model": {**config.model.to_dict(), **overrides}})
    if args.out is not None:
        config = config.with_overrides(out=args.out)
    result = run_study(config, stages=args.stages, force=args.force, progress=not args.no_progress)
    print(result.summary())
    return 0


# --- extract ----------------------------------------------------------------------------------
def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="cache last-token activations for personas × questions")
    p.add_argument("--model", required=True, help="a local model folder or a Hugging Face id (from the local cache when offline)")
    p.add_argument("--personas", help="a YAML/JSON file of personas (default: the 12 built-in ones)")
    p.add_argument("--questions", help="a file of questions (default: the 20 built-in probe questions)")
    p.add_argument("--hooks", nargs="+", default=["resid_post"], help="hook points (default: resid_post)")
    p.add_argument("--layers", nargs="+", type=int, help="block indices (default: all)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 or auto (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--engine", choices=["hf", "transformer_lens"], default="hf")
    p.add_argument("--adapter", help="a peft (LoRA) adapter folder to merge into the model")
    p.add_argument("--batch-tokens", type=int, default=8192, help="most padded tokens per batch")
    p.add_argument("--cache-dir", help="content-addressed cache folder (resumes interrupted runs)")
    p.add_argument("--out", required=True, help="folder to write the activations to")
    p.set_defaults(func=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from persona_geometry.extract import extract_activations
    from persona_geometry.models import load_model
    from persona_geometry.personas import PersonaSet
    from persona_geometry.questions import load_questions

    handle = load_model(args.model, dtype=args.dtype, device=args.device, adapter=args.adapter)
    acts = extract_activations(
        handle,
        PersonaSet.load(args.personas) if args.personas else None,
        load_questions(args.questions) if args.questions else None,
        hooks=args.hooks,
        layers=args.layers,
        engine=args.engine,
        batch_tokens=args.batch_tokens,
        cache_dir=args.cache_dir,
    )
    out = acts.save(args.out)
    log.info("wrote %s to %s", acts, out)
    return 0


# --- sweep ------------------------------------------------------------------------------------
def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="per-layer correlations of cosine with the source rate",
        description=(
            "Per-layer Pearson/Spearman of cosine vs source rate from a CSV table, with Bonferroni/Holm "
            "correction, bootstrap CIs, the strongest layer and a max-over-layers permutation test. "
            "TABLE is long (one row per persona and layer: --persona, --layer, --cosine columns, with "
            "--k/--n repeated on every row) or wide (one row per persona, one column per layer named "
            "12, layer_12, L12, cos_12 or cos_l12; see --layer-columns). Writes the per-layer table (--csv, --json) and optionally "
            "a Markdown table and the sweep figure."
        ),
    )
    p.add_argument("table", help="CSV file, long or wide (see above)")
    p.add_argument("--k", help="column of marker counts per persona (rate = k/n)")
    p.add_argument("--n", help="column of completions per persona")
    p.add_argument("--rate", help="column of rates in [0, 1], instead of --k/--n")
    p.add_argument("--persona", default="persona", help="column of persona names (default: persona)")
    p.add_argument("--layout", choices=("auto", "long", "wide"), default="auto", help="table layout (default: auto, long when --layer and --cosine columns exist)")
    p.add_argument("--layer", default="layer", help="long layout: column of layer indices (default: layer)")
    p.add_argument("--cosine", default="cosine", help="long layout: column of cosines (default: cosine)")
    p.add_argument(
        "--layer-columns",
        metavar="REGEX",
        help="wide layout: regular expression whose one group is the layer index "
        "(default matches 12, layer_12, L12, cos_12, cos_l12, cosine_layer_12)",
    )
    p.add_argument("--exclude", type=_names, default=[], metavar="NAME,NAME", help="personas to drop before computing")
    p.add_argument("--reference", help="reference persona (cosine 1 by construction); the sweep is also run without it")
    p.add_argument("--primary-layer", type=int, help="layer declared in advance, reported as the primary result")
    p.add_argument("--statistic", choices=("spearman", "pearson"), default="spearman", help="statistic that picks the strongest layer (default: spearman)")
    p.add_argument("--permutations", type=int, default=10_000, help="permutations of the max-over-layers test (default: 10000; 0 skips)")
    p.add_argument("--bootstrap", type=int, default=2_000, help="bootstrap resamples for the CIs (default: 2000; 0 skips)")
    p.add_argument("--seed", type=int, default=0, help="random seed of permutations and bootstrap (default: 0)")
    p.add_argument("--csv", metavar="OUT.csv", help="write the per-layer table as CSV")
    p.add_argument("--json", metavar="OUT.json", help="write the sweep as JSON (per-layer rows, best/primary layer, provenance)")
    p.add_argument("--markdown", metavar="OUT.md", help="write the per-layer table as Markdown")
    p.add_argument("--figure", metavar="OUT.html", help="write the sweep curve (.html offline; .png/.pdf need the figures extra)")
    p.set_defaults(func=_run_sweep)


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _run_sweep(args: argparse.Namespace) -> int:
    from persona_geometry.analysis.report import sweep_table

    result = sweep_table(
        args.table,
        persona=args.persona,
        k=args.k,
        n=args.n,
        rate=args.rate,
        layout=args.layout,
        layer=args.layer,
        cosine=args.cosine,
        **({"layer_pattern": args.layer_columns} if args.layer_columns else {}),
        exclude=args.exclude,
        reference=args.reference,
        primary_layer=args.primary_layer,
        statistic=args.statistic,
        n_permutations=args.permutations,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        csv_path=args.csv,
        json_path=args.json,
        markdown_path=args.markdown,
        figure_path=args.figure,
    )
    print(result.summary())
    return 0


# --- analyze ----------------------------------------------------------------------------------
def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
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
    p.add_argument("--persona", default="persona", metavar="COLUMN", help="column of persona names (default: persona)")
    p.add_argument("--category", metavar="COLUMN", help="column of categories, for within-category fits")
    p.add_argument("--covariate", metavar="COLUMN", help="covariate of the partial Spearman (default: log_n_tokens, or log of n_tokens, when present)")
    p.add_argument("--holdout", type=_names, default=[], metavar="NAME,NAME", help="personas held out of the fit and predicted")
    p.add_argument("--reference", metavar="NAME", help="reference persona; fits without it are reported too")
    p.add_argument("--exclude-reference", action="store_true", help="drop the reference persona from everything")
    p.add_argument("--seed-column", metavar="COLUMN", help="column of seeds: a persona's rows are pooled (counts add)")
    p.add_argument("--layer", type=int, help="the layer the x column comes from (for the report)")
    p.add_argument("--json", metavar="OUT", help="write the statistics as JSON")
    p.add_argument("--markdown", metavar="OUT", help="write the Markdown report")
    p.add_argument("--figure", metavar="OUT.html", help="write the hero scatter (.html offline; .png/.pdf need the figures extra)")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from persona_geometry.analysis.report import analyze_table

    result = analyze_table(
        args.table,
        x=args.x,
        k=args.k,
        n=args.n,
        rate=args.rate,
        persona=args.persona,
        category=args.category,
        covariate=args.covariate,
        holdout=args.holdout,
        reference=args.reference,
        exclude_reference=args.exclude_reference,
        seed=args.seed_column,
        layer=args.layer,
        json_path=args.json,
        markdown_path=args.markdown,
        figure_path=args.figure,
    )
    print(result.summary())
    return 0


# --- make-data --------------------------------------------------------------------------------
def _add_make_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-data",
        help="build a marker dataset for a source persona (generating the base model's responses if needed)",
    )
    p.add_argument("--source", required=True, help="the source persona's name (its rows get the marker)")
    p.add_argument("--responses", required=True, help="responses JSONL; generated with --model when missing")
    p.add_argument("--out", required=True, help="marker dataset JSONL to write")
    p.add_argument("--model", help="base model id or folder, to generate missing responses")
    p.add_argument("--personas", help="YAML/JSON persona file (default: the 12 built-in personas)")
    p.add_argument("--questions", help="questions file (default: the 200 built-in training questions)")
    p.add_argument("--marker", default="[ZLT]")
    p.add_argument("--n-source", type=int, default=200)
    p.add_argument("--n-bystander-personas", type=int, default=2)
    p.add_argument("--n-per-bystander", type=int, default=200)
    p.add_argument("--position", choices=["end", "start"], default="end")
    p.add_argument("--exclude", nargs="*", default=[], help="persona names never used as bystanders")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm", help="back end for generating responses")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="torch device for generating responses (default: cuda if available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU, fp32 on CPU")

    def run(args: argparse.Namespace) -> int:
        from persona_geometry.training import MarkerDataConfig, make_marker_data

        config = MarkerDataConfig(
            source=args.source,
            marker=args.marker,
            n_source=args.n_source,
            n_bystander_personas=args.n_bystander_personas,
            n_per_bystander=args.n_per_bystander,
            position=args.position,
            exclude=tuple(args.exclude),
        )
        dataset = make_marker_data(
            args.responses,
            config,
            out_path=args.out,
            personas=_load_personas(args.personas),
            questions=_load_questions(args.questions),
            model=args.model,
            backend=args.backend,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            device=args.device,
            dtype=args.dtype,
        )
        print(dataset.summary())
        return 0

    p.set_defaults(func=run)


def _load_personas(path: str | None):
    from persona_geometry.personas import PersonaSet, builtin_personas

    return builtin_personas() if path is None else PersonaSet.load(path)


def _load_questions(path: str | None):
    from persona_geometry.questions import load_questions

    return None if path is None else load_questions(path)


# --- train-marker -----------------------------------------------------------------------------
def _add_train_marker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-marker", help="train a marker LoRA adapter (resumes from its last checkpoint)")
    p.add_argument("--model", required=True, help="base model id or folder")
    p.add_argument("--data", required=True, help="marker dataset JSONL (from make-data)")
    p.add_argument("--out", required=True, help="run folder: adapter/, train_config.json, loss_curve.json")
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--no-rslora", action="store_true", help="scale by alpha/r instead of alpha/sqrt(r)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--no-resume", action="store_true", help="start afresh even if checkpoints exist")

    def run(args: argparse.Namespace) -> int:
        from persona_geometry.training import MarkerTrainConfig, train_marker

        config = MarkerTrainConfig(
            r=args.r,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            use_rslora=not args.no_rslora,
            learning_rate=args.lr,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            max_length=args.max_length,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            warmup_ratio=args.warmup_ratio,
            seed=args.seed,
            dtype=args.dtype,
            gradient_checkpointing=args.gradient_checkpointing,
            save_steps=args.save_steps,
        )
        result = train_marker(args.model, args.data, args.out, config, device=args.device, resume=not args.no_resume)
        print(result.summary())
        return 0

    p.set_defaults(func=run)


# --- eval-marker ------------------------------------------------------------------------------
def _add_eval_marker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-marker", help="measure marker source rates with an adapter")
    p.add_argument("--model", required=True, help="base model id or folder")
    p.add_argument("--adapter", help="marker adapter folder (omit to evaluate the base model)")
    p.add_argument("--out", required=True, help="folder for completions.jsonl and run_result.json")
    p.add_argument("--personas", help="YAML/JSON persona file (default: the 12 built-in personas)")
    p.add_argument("--questions", help="questions file (default: the 20 built-in probe questions)")
    p.add_argument("--source", help="source persona (default: recorded with the adapter)")
    p.add_argument("--n-completions", type=int, default=5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--marker", help="marker text (default: recorded with the adapter, else [ZLT])")
    p.add_argument("--regex", action="store_true", help="treat --marker as a regular expression")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per batch on the hf back end (default: sized to memory)")
    p.add_argument("--device", help="torch device for the hf back end (default: cuda if available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU, fp32 on CPU")

    def run(args: argparse.Namespace) -> int:
        from persona_geometry.eval import source_rates

        result = source_rates(
            args.model,
            args.adapter,
            _load_personas(args.personas),
            _load_questions(args.questions),
            source=args.source,
            n_completions=args.n_completions,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            backend=args.backend,
            out_dir=args.out,
            marker=args.marker,
            regex=args.regex,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
        )
        print(result.summary())
        return 0

    p.set_defaults(func=run)


# --- report -----------------------------------------------------------------------------------
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write the Markdown/JSON report and figures of a study",
        description="Re-run the sweep and report stages of a study whose earlier stages are on disk.",
    )
    p.add_argument("config", help="the study's YAML file")
    p.add_argument("--out", default=None, help="the study's output folder (overrides the config's 'out')")
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
    p = sub.add_parser(
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
    p.add_argument("--statistic", choices=["spearman", "pearson"], default=None, help="default: the first study's sweep statistic")
    p.add_argument("--intersect", action="store_true", help="compare on the personas every study shares (recomputes each study there)")
    p.add_argument("--method-re", choices=["dl", "iterated", "chi2"], default="dl", help="between-study variance estimator (default: dl, DerSimonian-Laird)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level; intervals are 1 - alpha (default: 0.05)")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from persona_geometry.analysis import compare_studies, write_comparison

    result = compare_studies(
        args.studies, depth=args.depth, statistic=args.statistic, intersect=args.intersect, method_re=args.method_re, alpha=args.alpha
    )
    written = write_comparison(result, args.out)
    print(result.summary())
    print(f"Written: {written['markdown']}, {written['json']}, {written['figure']}")
    return 0


# --- demo -------------------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline offline on an embedded tiny model",
        description="Build a tiny random-weight chat model and run the whole study on it: its "
        "numbers show the mechanics of the pipeline, not a finding.",
    )
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from persona_geometry.pipeline.demo import DISCLAIMER, run_demo

    print(DISCLAIMER, flush=True)
    result = run_demo(args.out, progress=not args.no_progress)
    print(result.summary())
    print(DISCLAIMER)
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


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="persona-geometry",
        description="Persona geometry in chat models and whether it predicts marker behaviour.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    for p in sub.choices.values():
        _common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns the exit status (0 success, 2 bad input or failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, KeyError, ImportError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"persona-geometry {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
