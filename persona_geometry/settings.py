"""Settings, declared once: each one's allowed values, default and help text.

The study config, the Python API and the command line read them from here (STYLE.md,
convention 14): a config dataclass declares a field with :func:`setting`, which carries the
default, the allowed values and the help text; ``ConfigDict.check_choices`` enforces the
allowed values and the CLI builds its options from the same fields. The allowed-value tuples
below are imported wherever a value is checked, never copied.

This module imports nothing heavy (no torch, no scipy), so that building the command line
parser, or validating a study config, stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AUTO_DTYPE",
    "BACKENDS",
    "DTYPES",
    "ENGINES",
    "EXECUTORS",
    "FIGURE_FORMATS",
    "HOOK_POINTS",
    "META_METHODS",
    "PLOTLYJS_MODES",
    "REPORT_TO",
    "STAGES",
    "STATIC_FORMATS",
    "STATISTICS",
    "TABLE_LAYOUTS",
    "TRAIN_DTYPES",
    "check_choices",
    "setting",
]

# Sampling back ends: vLLM (one engine, adapters as LoRA requests) and Hugging Face generate.
BACKENDS: tuple[str, ...] = ("vllm", "hf")
# Extraction engines.
ENGINES: tuple[str, ...] = ("hf", "transformer_lens")
# Hook points of the residual stream and the block outputs (TransformerLens's names).
HOOK_POINTS: tuple[str, ...] = ("resid_post", "resid_pre", "resid_mid", "attn_out", "mlp_out")
# The correlation statistics a sweep, a leakage test or a study can rank layers by.
STATISTICS: tuple[str, ...] = ("spearman", "pearson")
# Weight dtypes. "auto" (and None) is the one device rule every stage applies
# (``persona_geometry.models.resolve_precision``): float32 on CPU, bfloat16 on a GPU.
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
# Training runs in float32 or bfloat16 autocast; float16 training would need loss scaling.
TRAIN_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
# A study's stages, in pipeline order.
STAGES: tuple[str, ...] = ("extract", "data", "train", "eval", "sweep", "report")
# Where a study's units run: torchrun under a launcher else in process (auto), or as named.
EXECUTORS: tuple[str, ...] = ("auto", "inprocess", "torchrun", "ray")
# Layouts of a sweep table: one row per persona and layer, one row per persona, or guessed.
TABLE_LAYOUTS: tuple[str, ...] = ("auto", "long", "wide")
# Between-study variance estimators of a random-effects comparison (statsmodels' combine_effects).
META_METHODS: tuple[str, ...] = ("dl", "iterated", "chi2")
# Where training may also report its loss (``loss_curve.json`` is always written).
REPORT_TO: tuple[str, ...] = ("none", "tensorboard", "wandb")
# Figure files: HTML, or static images through kaleido (the figures extra) and a Chromium.
STATIC_FORMATS: tuple[str, ...] = ("png", "pdf", "svg", "jpeg", "jpg", "webp")
FIGURE_FORMATS: tuple[str, ...] = ("html", *STATIC_FORMATS)
# Where an HTML figure gets plotly.js: one plotly.min.js per folder, inlined, or a CDN.
PLOTLYJS_MODES: tuple[str, ...] = ("directory", "inline", "cdn")
# Said wherever a dtype default is shown.
AUTO_DTYPE = "auto: float32 on CPU, bfloat16 on GPU"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[Any] | None = None,
    cli: str | None = None,
    shown: str | None = None,
    metavar: str | None = None,
) -> Any:
    """Returns a dataclass field carrying a setting's default, allowed values and help text.

    Args:
        default: The default value (immutable: tuples, not lists); required when omitted.
        help: One line for ``--help`` and the docs, without the default (the CLI adds it).
        choices: The allowed values; each element of a tuple-valued setting is checked.
        cli: The command-line option's name when it is not the field's name (``"lr"`` for
            ``learning_rate``).
        shown: How ``--help`` shows the default when the value alone does not say it (what
            ``None`` means, for instance).
        metavar: The placeholder ``--help`` shows for the value.
    """
    metadata = {
        "help": help,
        "choices": None if choices is None else tuple(choices),
        "cli": cli,
        "shown": shown,
        "metavar": metavar,
    }
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(config: Any) -> None:
    """Raises ValueError if a field of the dataclass ``config`` holds a value outside its
    ``choices``."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        if choices is None:
            continue
        value = getattr(config, f.name)
        if value is None and f.default is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if v not in choices:
                raise ValueError(
                    f"The {f.name!r} parameter of {type(config).__name__} must be one of "
                    f"{list(choices)}. Got {v!r} instead."
                )
