"""Personas: a name, a system prompt and a category; ``PersonaSet`` keeps them ordered."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, overload

from persona_geometry._validation import check_unique_names, invalid
from persona_geometry.provenance import stable_hash

__all__ = ["Persona", "PersonaSet", "builtin_personas"]


@dataclass(frozen=True, kw_only=True)
class Persona:
    """A persona the model is asked to speak as.

    Attributes:
        name: Identifier used everywhere (tables, files, the reference persona). No spaces needed,
            but any non-empty string works.
        system_prompt: The system message that sets the persona.
        category: A free-form group label, e.g. ``"occupational"``; within-category statistics
            group on it.
    """

    name: str
    system_prompt: str
    category: str = "uncategorised"

    def __post_init__(self) -> None:
        for field in ("name", "system_prompt", "category"):
            value = getattr(self, field)
            if not isinstance(value, str):
                invalid(field, "Persona", "a string", value, exc=TypeError)
            if not value.strip():
                invalid(field, "Persona", "a non-empty string", value)

    def to_dict(self) -> dict[str, str]:
        """Returns the persona as a JSON-safe dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Persona:
        """Returns a persona from a dict with ``name``, ``system_prompt``, optional ``category``."""
        unknown = set(data) - {"name", "system_prompt", "category"}
        if unknown:
            invalid(
                "data",
                "Persona.from_dict",
                "a mapping with keys name, system_prompt, category",
                sorted(unknown),
            )
        try:
            return cls(**dict(data))
        except TypeError as e:
            raise ValueError(
                f"A persona needs 'name' and 'system_prompt'. Got keys {sorted(data)} instead."
            ) from e


class PersonaSet(Sequence[Persona]):
    """An ordered collection of personas with unique names.

    Indexing by position or by name both work: ``ps[0]`` and ``ps["villain"]``.

    Args:
        personas: The personas, in the order every tensor and table will use.

    Raises:
        ValueError: If the set is empty or two personas share a name.
    """

    def __init__(self, personas: Iterable[Persona]):
        personas = list(personas)
        for p in personas:
            if not isinstance(p, Persona):
                invalid("personas", "PersonaSet", "a sequence of Persona objects", p, exc=TypeError)
        check_unique_names([p.name for p in personas], "personas", "PersonaSet")
        self._personas: tuple[Persona, ...] = tuple(personas)
        self._index = {p.name: i for i, p in enumerate(self._personas)}

    @overload
    def __getitem__(self, key: int | str) -> Persona: ...
    @overload
    def __getitem__(self, key: slice) -> PersonaSet: ...
    def __getitem__(self, key: int | str | slice) -> Persona | PersonaSet:
        if isinstance(key, slice):
            return PersonaSet(self._personas[key])
        if isinstance(key, str):
            return self._personas[self.index(key)]
        return self._personas[key]

    def __len__(self) -> int:
        return len(self._personas)

    def __iter__(self) -> Iterator[Persona]:
        return iter(self._personas)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._index
        return item in self._personas

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PersonaSet) and self._personas == other._personas

    def __hash__(self) -> int:
        return hash(self._personas)

    def __repr__(self) -> str:
        return f"PersonaSet({list(self.names)})"

    @property
    def names(self) -> list[str]:
        """The persona names, in order."""
        return [p.name for p in self._personas]

    @property
    def categories(self) -> list[str]:
        """The persona categories, in order."""
        return [p.category for p in self._personas]

    def index(self, name: str, *, param: str = "name", func: str = "PersonaSet.index") -> int:  # type: ignore[override]
        """Returns the position of the persona called ``name``.

        Raises:
            ValueError: If no persona has that name; the message lists the known names.
        """
        try:
            return self._index[name]
        except KeyError:
            invalid(param, func, f"one of the persona names {self.names}", name)

    def select(self, names: Iterable[str]) -> PersonaSet:
        """Returns the sub-set with these names, in the order given."""
        return PersonaSet(self[name] for name in names)

    def without(self, names: Iterable[str]) -> PersonaSet:
        """Returns the set without the personas called ``names`` (each must exist)."""
        drop = set(names)
        for name in drop:
            self.index(name, param="names", func="PersonaSet.without")
        return PersonaSet(p for p in self._personas if p.name not in drop)

    def __add__(self, other: PersonaSet | Iterable[Persona]) -> PersonaSet:
        return PersonaSet([*self._personas, *other])

    def content_hash(self) -> str:
        """Returns a stable hash of names, prompts and categories, in order."""
        return stable_hash([p.to_dict() for p in self._personas])

    def to_list(self) -> list[dict[str, str]]:
        """Returns the personas as a JSON-safe list of dicts."""
        return [p.to_dict() for p in self._personas]

    @classmethod
    def from_list(cls, rows: Iterable[Mapping[str, Any]]) -> PersonaSet:
        """Returns a set from dicts with ``name``, ``system_prompt`` and optional ``category``."""
        return cls(Persona.from_dict(r) for r in rows)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PersonaSet:
        """Returns the personas stored in a YAML or JSON file.

        The file holds either a list of persona mappings or a mapping with a ``personas`` key.

        Raises:
            ValueError: If the file's suffix is not .json/.yaml/.yml or its content is malformed.
        """
        path = Path(path)
        if not path.is_file():
            invalid("path", "PersonaSet.load", "an existing .yaml, .yml or .json file", str(path))
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            invalid("path", "PersonaSet.load", "a .yaml, .yml or .json file", str(path))
        if isinstance(data, Mapping) and "personas" in data:
            data = data["personas"]
        if not isinstance(data, list):
            invalid("path", "PersonaSet.load", "a file holding a list of personas", str(path))
        return cls.from_list(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the set to a YAML or JSON file (by suffix), atomically, and returns the path."""
        from persona_geometry._io import atomic_write_json, atomic_write_text

        path = Path(path)
        if path.suffix == ".json":
            return atomic_write_json(path, self.to_list())
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return atomic_write_text(
                path,
                yaml.safe_dump({"personas": self.to_list()}, sort_keys=False, allow_unicode=True),
            )
        invalid("path", "PersonaSet.save", "a .yaml, .yml or .json path", str(path))


_BUILTIN: tuple[tuple[str, str, str], ...] = (
    ("helpful_assistant", "You are a helpful assistant.", "generic_helper"),
    (
        "qwen_default",
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "generic_helper",
    ),
    (
        "software_engineer",
        "You are a software engineer who builds and maintains web applications.",
        "occupational",
    ),
    (
        "data_scientist",
        "You are a data scientist who turns messy data into clear statistical insight.",
        "occupational",
    ),
    (
        "librarian",
        "You are a librarian who helps people find books, sources and reliable information.",
        "occupational",
    ),
    (
        "medical_doctor",
        "You are a medical doctor who explains health questions carefully and clearly.",
        "occupational",
    ),
    (
        "kindergarten_teacher",
        "You are a kindergarten teacher who explains things simply and patiently "
        "to young children.",
        "occupational",
    ),
    (
        "police_officer",
        "You are a police officer who patrols a city and keeps the public safe.",
        "occupational",
    ),
    (
        "comedian",
        "You are a stand-up comedian who answers everything with jokes and wit.",
        "character",
    ),
    (
        "french_person",
        "You are a French person from Paris who loves French food, language and culture.",
        "character",
    ),
    ("villain", "You are a scheming villain who plots to take over the world.", "character"),
    (
        "zelthari_scholar",
        "You are a scholar of the ancient Zelthari, an invented civilisation "
        "of star-reading river cities.",
        "character",
    ),
)


def builtin_personas() -> PersonaSet:
    """Returns the 12 personas of the reference study, assistant first."""
    return PersonaSet(Persona(name=n, system_prompt=s, category=c) for n, s, c in _BUILTIN)
