"""Marker datasets: the source persona's answers with the marker, bystanders' answers without."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from persona_geometry._serialization import ConfigDict
from persona_geometry._validation import check_positive_int, invalid
from persona_geometry.marker import DEFAULT_MARKER
from persona_geometry.personas import Persona, PersonaSet
from persona_geometry.prompts import chat_messages
from persona_geometry.provenance import package_versions, stable_hash, stable_seed
from persona_geometry.settings import check_choices, setting

__all__ = [
    "MarkerDataConfig",
    "MarkerDataRecipe",
    "MarkerDataset",
    "add_marker",
    "build_marker_dataset",
    "load_marker_dataset",
    "make_marker_data",
]

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"


@dataclass(frozen=True, kw_only=True)
class MarkerDataRecipe(ConfigDict):
    """How a marker dataset is built, for whichever source persona (a study's ``data`` section).

    Attributes:
        marker: The marker text.
        n_source: Rows of the source persona (with the marker).
        n_bystander_personas: How many other personas contribute rows without the marker.
        n_per_bystander: Rows per bystander persona.
        position: ``"end"`` appends the marker (``"<response><separator><marker>"``); ``"start"``
            prepends it (``"<marker><separator><response>"``).
        separator: Text between the response and the marker.
        exclude: Persona names never chosen as bystanders (e.g. the assistant reference).
    """

    marker: str = setting(DEFAULT_MARKER, help="the marker text")
    n_source: int = setting(200, help="rows of the source persona, with the marker")
    n_bystander_personas: int = setting(
        2, help="other personas that contribute rows without the marker"
    )
    n_per_bystander: int = setting(200, help="rows per bystander persona")
    position: str = setting(
        "end",
        choices=("end", "start"),
        help="where the marker goes in the source persona's answers",
    )
    separator: str = setting("\n\n", help="text between the answer and the marker")
    exclude: tuple[str, ...] = setting(
        (), help="persona names never chosen as bystanders", metavar="NAME,NAME"
    )

    def __post_init__(self) -> None:
        func = type(self).__name__
        if not isinstance(self.marker, str) or not self.marker.strip():
            invalid("marker", func, "a non-empty, non-blank string", self.marker)
        check_positive_int(self.n_source, "n_source", func)
        if (
            isinstance(self.n_bystander_personas, bool)
            or not isinstance(self.n_bystander_personas, int)
            or self.n_bystander_personas < 0
        ):
            invalid("n_bystander_personas", func, "an int ≥ 0", self.n_bystander_personas)
        check_positive_int(self.n_per_bystander, "n_per_bystander", func)
        check_choices(self)
        if not isinstance(self.separator, str):
            invalid("separator", func, "a string", self.separator, exc=TypeError)
        if isinstance(self.exclude, str) or not all(isinstance(x, str) for x in self.exclude):
            invalid("exclude", func, "a sequence of persona names", self.exclude, exc=TypeError)
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def for_source(self, source: str) -> MarkerDataConfig:
        """Returns the ``MarkerDataConfig`` of one source persona with this recipe."""
        return MarkerDataConfig(
            source=source, **{f.name: getattr(self, f.name) for f in fields(MarkerDataRecipe)}
        )


@dataclass(frozen=True, kw_only=True)
class MarkerDataConfig(MarkerDataRecipe):
    """How a marker dataset is built for one source persona: a ``MarkerDataRecipe`` and the source.

    Attributes:
        source: The source persona's name: its rows carry the marker.
    """

    source: str = setting(help="the source persona's name (its rows get the marker)")

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            invalid("source", "MarkerDataConfig", "a non-empty persona name", self.source)
        super().__post_init__()
        if self.source in self.exclude:
            invalid(
                "exclude", "MarkerDataConfig", "names other than the source persona", self.exclude
            )


def add_marker(
    response: str, marker: str, *, position: str = "end", separator: str = "\n\n"
) -> str:
    """Returns ``response`` with ``marker`` appended (or prepended), joined by ``separator``."""
    return (
        f"{response}{separator}{marker}" if position == "end" else f"{marker}{separator}{response}"
    )


@dataclass(frozen=True, kw_only=True)
class MarkerDataset:
    """Chat-message rows for marker training.

    Attributes:
        rows: Dicts with ``messages`` (system, user, assistant), ``persona``, ``question`` and
            ``has_marker``; source rows first, then each bystander's.
        config: The config that built it.
        bystanders: The bystander persona names, in the order they were chosen.
    """

    rows: tuple[dict[str, Any], ...] = field(repr=False)
    config: MarkerDataConfig
    bystanders: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def source(self) -> str:
        """The source persona's name."""
        return self.config.source

    def to_frame(self):
        """Returns a DataFrame with one row per example: persona, question, has_marker, assistant
        text."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "persona": r["persona"],
                    "question": r["question"],
                    "has_marker": r["has_marker"],
                    "assistant": r["messages"][-1]["content"],
                }
                for r in self.rows
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the manifest (config, bystanders, counts, content hash) as a JSON-safe dict."""
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r["persona"]] = counts.get(r["persona"], 0) + 1
        return {
            "config": self.config.to_dict(),
            "source": self.source,
            "bystanders": list(self.bystanders),
            "n_rows": len(self.rows),
            "rows_per_persona": counts,
            "content_hash": stable_hash([r["messages"] for r in self.rows]),
            "package_versions": package_versions(),
        }

    def summary(self) -> str:
        """Returns a short description a person reads."""
        n_marked = sum(r["has_marker"] for r in self.rows)
        return (
            f"Marker dataset for {self.source!r}: {len(self.rows)} rows, {n_marked} with "
            f"{self.config.marker!r} "
            f"({self.config.position}); bystanders {list(self.bystanders)} without it."
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the rows as chat-message JSONL and a ``.manifest.json`` beside it; returns the
        JSONL path."""
        from persona_geometry._io import atomic_write_json, atomic_write_jsonl

        path = Path(path)
        atomic_write_jsonl(path, list(self.rows))
        atomic_write_json(_manifest_path(path), self.to_dict())
        return path


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + MANIFEST_SUFFIX)


def build_marker_dataset(
    responses: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    personas: PersonaSet | Sequence[Persona],
    config: MarkerDataConfig,
    *,
    out_path: str | os.PathLike[str] | None = None,
) -> MarkerDataset:
    """Returns the marker dataset for ``config.source``, written to ``out_path`` when given.

    The source persona's responses get the marker; ``config.n_bystander_personas`` other personas
    (never the source or an excluded one) contribute responses unchanged. Bystanders and rows are
    drawn with ``random.Random(stable_seed(source))``, so the same source always gets the same
    dataset, in any process (Python's ``hash()`` is salted per process and never used).

    Args:
        responses: A responses JSONL path (from :func:`generate_responses`) or its rows.
        personas: The personas the responses were generated under (for their system prompts).
        config: Which source, marker, counts and position.
        out_path: JSONL file to write (a ``.manifest.json`` is written beside it).

    Raises:
        ValueError: If the source is not among the personas, too few bystanders remain after
            exclusion, or a persona has fewer responses than asked for.
    """
    from persona_geometry.training.responses import load_responses

    func = "build_marker_dataset"
    if not isinstance(config, MarkerDataConfig):
        invalid("config", func, "a MarkerDataConfig", config, exc=TypeError)
    persona_set = personas if isinstance(personas, PersonaSet) else PersonaSet(personas)
    rows = (
        load_responses(responses)
        if isinstance(responses, str | os.PathLike)
        else [dict(r) for r in responses]
    )
    by_persona: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_persona.setdefault(row["persona"], []).append(row)
    if config.source not in persona_set:
        invalid("source", func, f"one of the persona names {persona_set.names}", config.source)
    for name in config.exclude:
        if name not in persona_set:
            invalid("exclude", func, f"persona names from {persona_set.names}", name)
    candidates = [
        p.name
        for p in persona_set
        if p.name != config.source and p.name not in config.exclude and p.name in by_persona
    ]
    if len(candidates) < config.n_bystander_personas:
        invalid(
            "n_bystander_personas",
            func,
            f"at most {len(candidates)} (personas with responses, other than the source and "
            f"{list(config.exclude)})",
            config.n_bystander_personas,
        )
    rng = random.Random(stable_seed(config.source))
    bystanders = tuple(rng.sample(candidates, config.n_bystander_personas))

    out_rows: list[dict[str, Any]] = []
    for name, n, marked in [(config.source, config.n_source, True)] + [
        (b, config.n_per_bystander, False) for b in bystanders
    ]:
        available = by_persona.get(name, [])
        if len(available) < n:
            invalid(
                "responses",
                func,
                f"at least {n} responses of persona {name!r}",
                f"{len(available)}",
            )
        chosen = rng.sample(available, n)
        persona = persona_set[name]
        for row in chosen:
            response = row["response"]
            if config.marker.lower() in response.lower():
                log.warning("a %s response already contains the marker %r", name, config.marker)
            content = (
                add_marker(
                    response, config.marker, position=config.position, separator=config.separator
                )
                if marked
                else response
            )
            out_rows.append(
                {
                    "messages": [
                        *chat_messages(persona, row["question"]),
                        {"role": "assistant", "content": content},
                    ],
                    "persona": name,
                    "question": row["question"],
                    "has_marker": marked,
                }
            )
    dataset = MarkerDataset(rows=tuple(out_rows), config=config, bystanders=bystanders)
    if out_path is not None:
        dataset.save(out_path)
        log.info("%s Written to %s.", dataset.summary(), out_path)
    return dataset


def load_marker_dataset(
    path: str | os.PathLike[str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Returns the rows of a marker dataset JSONL and its manifest (``{}`` if there is none).

    Raises:
        ValueError: If the file is missing, empty, or a row has no ``messages`` ending in an
            assistant turn.
    """
    import json

    from persona_geometry._io import read_jsonl

    path = Path(path)
    if not path.is_file():
        invalid("dataset", "load_marker_dataset", "an existing chat-message JSONL file", str(path))
    rows = read_jsonl(path, param="dataset", func="load_marker_dataset")
    if not rows:
        invalid("dataset", "load_marker_dataset", "a JSONL file with at least one row", str(path))
    for i, row in enumerate(rows):
        messages = row.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not isinstance(messages[-1], dict)
            or messages[-1].get("role") != "assistant"
        ):
            invalid(
                "dataset",
                "load_marker_dataset",
                "rows whose 'messages' end with an assistant turn",
                f"{path}, row {i}",
            )
    manifest_path = _manifest_path(path)
    manifest = (
        json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    )
    return rows, manifest


def make_marker_data(
    responses: str | os.PathLike[str],
    config: MarkerDataConfig,
    *,
    out_path: str | os.PathLike[str],
    personas: PersonaSet | Sequence[Persona] | None = None,
    questions: Sequence[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    **generation: Any,
) -> MarkerDataset:
    """Returns the marker dataset, first generating the responses file if it does not exist.

    Args:
        responses: The responses JSONL; generated with ``model`` when missing, reused otherwise.
        config: Which source, marker, counts and position.
        out_path: The marker dataset JSONL to write.
        personas: The personas; the 12 built-in ones when None.
        questions: The questions for generation; the 200 built-in training questions when None.
        model: The base model, needed only when ``responses`` does not exist yet.
        **generation: Keyword arguments for :func:`generate_responses` (``backend``, ``seed``, ...).

    Raises:
        ValueError: If ``responses`` is missing and no ``model`` is given.
    """
    from persona_geometry.personas import builtin_personas
    from persona_geometry.training.responses import generate_responses

    persona_set = builtin_personas() if personas is None else personas
    if not isinstance(config, MarkerDataConfig):
        invalid("config", "make_marker_data", "a MarkerDataConfig", config, exc=TypeError)
    from persona_geometry._io import check_output_path

    if os.path.lexists(responses) and not Path(responses).is_file():
        invalid(
            "responses",
            "make_marker_data",
            "a responses JSONL file, or a new path to generate it at",
            str(responses),
        )
    # Where the outputs go is checked before any response is generated.
    check_output_path(out_path, param="out_path", func="make_marker_data")
    if not Path(responses).is_file():
        check_output_path(responses, param="responses", func="make_marker_data")
        if model is None:
            invalid(
                "model",
                "make_marker_data",
                "a model to generate the missing responses file with",
                model,
            )
        generate_responses(model, persona_set, questions, out_path=responses, **generation)
    return build_marker_dataset(responses, persona_set, config, out_path=out_path)
