"""The activation store: safetensors plus a JSON manifest, a content-addressed cache, resumable chunks.

On disk an ``ActivationSet`` is a folder with ``activations.safetensors`` (one tensor per hook
point, ``[persona, question, layer, d_model]``, and ``n_tokens``) and ``manifest.json`` (the
labels and the provenance). Loading reads safetensors and JSON only: nothing is unpickled.

The cache under ``cache_dir`` is keyed by a stable hash of everything that determines the
result (``cache_key``); a folder whose manifest does not carry exactly that key is never
reused. While an extraction runs, each finished chunk of prompts is written atomically as its
own safetensors file under ``<key>.partial/``, so a run that was interrupted resumes with the
chunks it already has; the finished set then replaces the partial folder atomically.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from persona_geometry._io import atomic_path
from persona_geometry.activations import (
    _MANIFEST,
    FORMAT,
    FORMAT_VERSION,
    ActivationSet,
    load_activations,
    save_activations,
)
from persona_geometry.manifest import Manifest
from persona_geometry.provenance import stable_hash
from persona_geometry.resume import KeyedFolder

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KEY_FIELDS",
    "Manifest",
    "PartialRun",
    "cache_key",
    "load_activations",
    "load_cached",
    "save_activations",
]

log = logging.getLogger(__name__)


# The manifest fields that determine the numbers (and labels) of an extraction (see ``Manifest``).
KEY_FIELDS: tuple[str, ...] = Manifest.KEY_FIELDS


def cache_key(manifest: Manifest | Mapping[str, Any]) -> str:
    """Returns the stable hash of the manifest's ``KEY_FIELDS``: the cache folder's name."""
    return Manifest.from_dict(manifest, func="cache_key").key()


def load_cached(cache_dir: str | os.PathLike[str], manifest: Manifest | Mapping[str, Any]) -> ActivationSet | None:
    """Returns the cached set for this manifest's key, or None when there is none to trust.

    A folder whose stored key fields differ from ``manifest``'s (a hash collision, a
    hand-edited manifest, an older format) is reported and ignored, never reused.
    """
    manifest = Manifest.from_dict(manifest, func="load_cached")
    folder = Path(cache_dir) / manifest.key()
    if not (folder / _MANIFEST).is_file():
        return None
    try:
        acts = load_activations(folder)
    except (ValueError, OSError, KeyError) as e:
        log.warning("ignoring unreadable cache entry %s: %s", folder, e)
        return None
    stored = {k: acts.manifest.get(k) for k in KEY_FIELDS}
    wanted = manifest.key_fields()
    if stored != wanted:
        diff = sorted(k for k in KEY_FIELDS if stored[k] != wanted[k])
        log.warning("cache entry %s does not match this extraction (fields %s differ); recomputing", folder, diff)
        return None
    return acts


class PartialRun:
    """The chunks of an unfinished extraction, under ``<cache_dir>/<key>.partial/``.

    Each chunk is one safetensors file holding ``indices`` (prompt positions) and one
    ``[prompt, layer, d_model]`` tensor per hook, written atomically; a chunk is either whole
    or absent. ``key.json`` (a ``KeyedFolder`` record) holds the key and its fields, and a
    folder made for other settings is discarded rather than mixed in.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], manifest: Manifest | Mapping[str, Any]):
        manifest = Manifest.from_dict(manifest, func="PartialRun")
        self.key = manifest.key()
        self.fields = manifest.key_fields()
        self._keyed = KeyedFolder(Path(cache_dir) / f"{self.key}.partial", self.key, record="key.json")
        self.folder = self._keyed.folder
        if self._keyed.state() == "stale":
            log.warning("discarding partial extraction %s: it was made for other settings", self.folder)
        self._keyed.begin(fields=self.fields)

    def chunks(self) -> list[Path]:
        """Returns the finished chunk files."""
        return sorted(self.folder.glob("chunk-*.safetensors"))

    def done(self) -> set[int]:
        """Returns the prompt positions already computed."""
        from safetensors import safe_open

        out: set[int] = set()
        for f in self.chunks():
            with safe_open(str(f), framework="pt") as sf:
                out.update(sf.get_tensor("indices").tolist())
        return out

    def write(self, indices: Sequence[int], tensors: Mapping[str, Float[Tensor, "prompt layer d_model"]]) -> Path:
        """Writes one finished chunk atomically and returns its file."""
        from safetensors.torch import save_file

        idx = torch.as_tensor(list(indices), dtype=torch.long)
        payload = {hook: t.detach().to("cpu").contiguous() for hook, t in tensors.items()}
        payload["indices"] = idx
        path = self.folder / f"chunk-{int(idx.min()):07d}-{stable_hash(idx.tolist(), length=12)}.safetensors"
        with atomic_path(path) as tmp:
            save_file(payload, str(tmp))
        return path

    def assemble(self, n_prompts: int, hooks: Sequence[str]) -> dict[str, Float[Tensor, "prompt layer d_model"]]:
        """Returns ``{hook: [prompt, layer, d_model]}`` in prompt order, from every chunk.

        Raises:
            RuntimeError: If some prompt is missing or appears in two chunks.
        """
        from safetensors.torch import load_file

        out: dict[str, Tensor] = {}
        seen = torch.zeros(n_prompts, dtype=torch.long)
        for f in self.chunks():
            chunk = load_file(str(f))
            idx = chunk["indices"]
            seen[idx] += 1
            for hook in hooks:
                if hook not in out:
                    out[hook] = torch.empty((n_prompts, *chunk[hook].shape[1:]), dtype=chunk[hook].dtype)
                out[hook][idx] = chunk[hook]
        if not bool((seen == 1).all()):
            raise RuntimeError(f"the partial extraction {self.folder} does not cover every prompt exactly once")
        return out

    def finish(self, acts: ActivationSet) -> Path:
        """Saves the finished set as the cache entry and removes the partial folder."""
        final = save_activations(acts, self.folder.parent / self.key)
        shutil.rmtree(self.folder, ignore_errors=True)
        return final
