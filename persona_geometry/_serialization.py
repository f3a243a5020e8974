"""``to_dict``/``from_dict`` for the keyword-only config dataclasses, written once.

Configs (``MarkerDataConfig``, ``MarkerTrainConfig``, ``SamplingSettings``, ``ProbeConfig``,
the study's sections) round-trip through JSON and YAML, which know lists but not tuples: tuples
become lists on the way out and lists become tuples again for fields typed as tuples.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from persona_geometry._validation import invalid

__all__ = ["ConfigDict", "coerce_fields", "plain"]


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
