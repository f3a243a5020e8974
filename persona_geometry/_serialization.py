"""``to_dict``/``from_dict`` for the keyword-only config dataclasses, written once.

Configs (``MarkerDataConfig``, ``MarkerTrainConfig``, ``SamplingSettings``, ``ProbeConfig``,
the study's sections) round-trip through JSON and YAML, which know lists but not tuples: tuples
become lists on the way out and lists become tuples again for fields typed as tuples.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from persona_geometry._validation import invalid

__all__ = ["ConfigDict", "coerce_fields", "one_line", "parse_structured", "plain", "read_text_file"]


def plain(obj: Any) -> Any:
    """Returns ``obj`` with tuples turned into lists, recursively (JSON/YAML-safe containers)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def _accepts_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) is tuple:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts_tuple(h) for h in typing.get_args(hint))
    return False


def coerce_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Returns ``data`` with lists turned into tuples where ``cls``'s field is typed as a tuple."""
    hints = typing.get_type_hints(cls)
    return {
        k: tuple(v) if isinstance(v, list) and _accepts_tuple(hints.get(k)) else v
        for k, v in data.items()
    }


class ConfigDict:
    """Mixin for frozen config dataclasses: ``to_dict`` (JSON-safe) and ``from_dict`` (strict)."""

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-safe dict (tuples as lists)."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Returns a config from ``to_dict``'s output.

        Raises:
            ValueError: On an unknown key, or a value the config rejects.
        """
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            invalid(
                "data",
                f"{cls.__name__}.from_dict",
                f"a mapping with keys from {sorted(known)}",
                unknown,
            )
        return cls(**coerce_fields(cls, data))


def one_line(error: BaseException | str) -> str:
    """Returns an error message on one line (YAML and Jinja messages span several)."""
    return " ".join(str(error).split())


def read_text_file(path: str | os.PathLike[str], *, param: str, func: str) -> str:
    """Returns the UTF-8 text of ``path``.

    Raises:
        ValueError: If the file is missing, a folder, unreadable or not UTF-8 (one line naming it).
    """
    path = Path(path)
    if not path.is_file():
        invalid(param, func, "an existing file", str(path))
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"The {param!r} parameter of {func} must be a readable UTF-8 file. "
            f"Got {str(path)!r} instead: {one_line(e)}"
        ) from e


def parse_structured(text: str, path: str | os.PathLike[str], *, param: str, func: str) -> Any:
    """Returns the JSON (``.json``) or YAML (otherwise) in ``text``, read from ``path``.

    YAML is read with the safe loader, and a mapping that repeats a key is refused rather than
    letting the last value win silently.

    Raises:
        ValueError: On a syntax error or a repeated key (one line naming the file).
    """
    import json

    import yaml

    kind = "JSON" if Path(path).suffix == ".json" else "YAML"
    try:
        if kind == "JSON":
            return json.loads(text, object_pairs_hook=_unique_pairs)
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(
            f"The {param!r} parameter of {func} must be a valid {kind} file. "
            f"Got {str(path)!r} instead: {one_line(e)}"
        ) from e


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice")
        out[k] = v
    return out


@functools.cache
def _unique_key_loader() -> type:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses a mapping repeating a key."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"the key {key!r} appears twice (line {key_node.start_mark.line + 1})",
                        key_node.start_mark,
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader
