"""``Manifest``: the typed record of what produced an activation set, and its cache key.

The fields that determine an extraction's numbers and labels are typed attributes; everything
else recorded beside them (batch sizes, device, creation time, package versions, the cache key
itself, extension history) lives in ``extra``. A ``Manifest`` is also a read-only ``Mapping``
over both, so code that reads a manifest as a dict (``m["dtype"]``, ``m.get("created")``)
works on either form, and ``to_dict()`` is exactly what ``manifest.json`` stores.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from persona_geometry._validation import invalid
from persona_geometry.provenance import stable_hash

__all__ = ["Manifest"]


@dataclass(frozen=True, kw_only=True)
class Manifest(Mapping[str, Any]):
    """What an activation set was computed from; ``key()`` names its cache folder.

    Attributes:
        format_version: The store's format version.
        model_id: The model's name or path.
        revision: The hub revision, or None.
        weights_id: A stable identity of the weights (a hub commit or a parameter hash).
        dtype: The precision the model ran at, e.g. ``"float32"``.
        engine: The extraction engine, ``"hf"`` or ``"transformer_lens"``.
        hooks: The hook points captured, e.g. ``["resid_post"]``.
        layers: The block indices captured.
        chat_template_hash: Hash of the chat template text used to render the prompts.
        persona_hash: Content hash of the personas.
        question_hash: Hash of the questions.
        prompt_ids_hash: Hash of the rendered prompt token ids.
        layer_template: The module path of the transformer blocks (``model.layers.{num}``), or None.
        share_prefix: Whether shared prompt prefixes were computed once.
        extra: Everything else recorded (not part of the key).
    """

    format_version: int
    model_id: str | None
    revision: str | None
    weights_id: str | None
    dtype: str | None
    engine: str | None
    hooks: Sequence[str]
    layers: Sequence[int]
    chat_template_hash: str | None
    persona_hash: str | None
    question_hash: str | None
    prompt_ids_hash: str | None
    layer_template: str | None
    share_prefix: bool
    extra: Mapping[str, Any] = field(default_factory=dict)

    # The fields that determine the numbers (and labels) of an extraction: the cache key covers
    # exactly these. Batch sizes are not among them (batching moves float32 results by ~1e-7).
    KEY_FIELDS: ClassVar[tuple[str, ...]]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, func: str = "Manifest.from_dict") -> Manifest:
        """Returns the manifest of a mapping holding at least the ``KEY_FIELDS``.

        Raises:
            ValueError: If a key field is missing.
        """
        if isinstance(data, Manifest):
            return data
        missing = [k for k in cls.KEY_FIELDS if k not in data]
        if missing:
            invalid(
                "manifest",
                func,
                f"a mapping with the fields {list(cls.KEY_FIELDS)}",
                f"missing {missing}",
            )
        return cls(
            **{k: data[k] for k in cls.KEY_FIELDS},
            extra={k: v for k, v in data.items() if k not in cls.KEY_FIELDS},
        )

    def key_fields(self) -> dict[str, Any]:
        """Returns the key fields as plain JSON types."""
        return _json_safe({k: getattr(self, k) for k in self.KEY_FIELDS})

    def key(self) -> str:
        """Returns the stable hash of the key fields: the cache folder's name."""
        return stable_hash({k: getattr(self, k) for k in self.KEY_FIELDS}, length=24)

    def to_dict(self) -> dict[str, Any]:
        """Returns the key fields and ``extra`` as one JSON-safe dict (``manifest.json``'s form)."""
        return _json_safe(dict(self.items()))

    def replace(self, **changes: Any) -> Manifest:
        """Returns a copy with these fields (key fields or ``extra`` entries) changed."""
        fields = {k: changes.pop(k) for k in list(changes) if k in self.KEY_FIELDS}
        return dataclasses.replace(self, **fields, extra={**self.extra, **changes})

    # Mapping interface ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        if name in self.KEY_FIELDS:
            return getattr(self, name)
        return self.extra[name]

    def __iter__(self) -> Iterator[str]:
        yield from self.KEY_FIELDS
        yield from (k for k in self.extra if k not in self.KEY_FIELDS)

    def __len__(self) -> int:
        return len(self.KEY_FIELDS) + sum(k not in self.KEY_FIELDS for k in self.extra)


Manifest.KEY_FIELDS = tuple(f.name for f in dataclasses.fields(Manifest) if f.name != "extra")


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
