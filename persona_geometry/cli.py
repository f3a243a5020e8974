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
    p = sub.add_parser("sweep", help="per-layer correlations of cosine with the source rate")
    p.set_defaults(func=_not_yet)


# --- analyze ----------------------------------------------------------------------------------
def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="robustness statistics at one layer, from a CSV table")
    p.set_defaults(func=_not_yet)


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
