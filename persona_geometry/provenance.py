"""Provenance: what produced a file, so that results can be traced and caches trusted."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from importlib import metadata
from typing import Any

_TRACKED_PACKAGES = (
    "persona-geometry",
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "safetensors",
    "transformer-lens",
    "vllm",
    "numpy",
    "scipy",
    "statsmodels",
    "scikit-learn",
)


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions.items())


def package_versions() -> dict[str, str]:
    """Returns the installed versions of the packages that can change this project's numbers.

    Read once per process (scanning installed distributions takes tens of milliseconds).
    """
    return dict(_versions())


def stable_hash(obj: Any, *, length: int = 16) -> str:
    """Returns a hex digest of ``obj``'s canonical JSON: equal for equal content, across runs.

    Python's ``hash()`` is salted per process, so it must never key anything stored on disk.
    """
    payload = json.dumps(
        obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def stable_seed(*parts: Any) -> int:
    """Returns a 32-bit seed derived deterministically from ``parts`` (e.g. a persona name)."""
    return int(stable_hash(list(parts), length=8), 16)
