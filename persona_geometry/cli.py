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
    p = sub.add_parser("run", help="run a whole study from a YAML config")
    p.add_argument("config", help="the study's YAML file")
    p.set_defaults(func=_not_yet)


# --- extract ----------------------------------------------------------------------------------
def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="cache last-token activations for personas × questions")
    p.set_defaults(func=_not_yet)


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
            "12, layer_12, L12 or cos_12). Writes the per-layer table (--csv, --json) and optionally "
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
    p = sub.add_parser("make-data", help="build a marker dataset for a source persona")
    p.set_defaults(func=_not_yet)


# --- train-marker -----------------------------------------------------------------------------
def _add_train_marker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-marker", help="train a marker LoRA adapter")
    p.set_defaults(func=_not_yet)


# --- eval-marker ------------------------------------------------------------------------------
def _add_eval_marker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-marker", help="measure marker source rates with an adapter")
    p.set_defaults(func=_not_yet)


# --- report -----------------------------------------------------------------------------------
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the Markdown/JSON report and figures of a study")
    p.set_defaults(func=_not_yet)


# --- demo -------------------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline offline on an embedded tiny model")
    p.set_defaults(func=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    raise UsageError(f"'{args.command}' is not available in this build yet")


_SUBCOMMANDS = (
    _add_run,
    _add_extract,
    _add_sweep,
    _add_analyze,
    _add_make_data,
    _add_train_marker,
    _add_eval_marker,
    _add_report,
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
