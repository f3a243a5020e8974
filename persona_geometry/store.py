"""The activation store: safetensors plus a JSON manifest, a content-addressed cache, resumable
chunks.

On disk an ``ActivationSet`` is a folder with ``activations.safetensors`` (one tensor per hook
point, ``[persona, question, layer, d_model]``, and ``n_tokens``) and ``manifest.json`` (the
labels and the provenance). Loading reads safetensors and JSON only: nothing is unpickled.

The cache under ``cache_dir`` is keyed by a stable hash of everything that determines the
result (``cache_key``); a folder whose manifest does not carry exactly that key is never
reused. While an extraction runs, each finished chunk of prompts is written atomically as its
own safetensors file under ``<key>.partial/``, so a run that was interrupted resumes with the
chunks it already has; the finished set then replaces the partial folder atomically.

Integrity: every tensor file carries a SHA-256 (the set's in its manifest, a chunk's in its
file name) that is checked when it is read; an entry or chunk that fails (truncated, flipped
bytes, edited labels) is reported once and recomputed, never used. One process at a time
works on an entry: ``.locks/<key>.lock`` (a file lock) is held from the cache lookup to the finished
entry, so a second process extracting the same set waits and then loads the first one's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from persona_geometry._io import atomic_write_bytes
from persona_geometry.activations import (
    _MANIFEST,
    FORMAT,
    FORMAT_VERSION,
    ActivationSet,
    load_activations,
    safetensors_bytes,
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


def load_cached(
    cache_dir: str | os.PathLike[str], manifest: Manifest | Mapping[str, Any]
) -> ActivationSet | None:
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
        log.warning(
            "cache entry %s does not match this extraction (fields %s differ); recomputing",
            folder,
            diff,
        )
        return None
    # The labels must be the ones the key was made from (a manifest whose persona list was
    # edited, checksum and all, would otherwise put the rows under the wrong names).
    labels = {
        "persona_hash": acts.personas.content_hash(),
        "question_hash": stable_hash(list(acts.questions)),
        "layers": list(acts.layers),
    }
    if any(labels[k] != wanted[k] for k in labels):
        log.warning("cache entry %s holds labels other than its key's; recomputing", folder)
        return None
    return acts


def entry_lock(cache_dir: str | os.PathLike[str], key: str) -> Any:
    """Returns the file lock of the cache entry ``key`` (``<cache_dir>/.locks/<key>.lock``), not
    yet held."""
    from filelock import FileLock

    locks = Path(cache_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{key}.lock"))


def _acquire(lock: Any, what: str) -> bool:
    """Takes ``lock``; returns whether it had to wait for another process holding it."""
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another process working on %s", what)
        lock.acquire()
        return True
    return False


_CHUNK = re.compile(r"chunk-\d{7}-[0-9a-f]{16}\.safetensors")


class PartialRun:
    """The chunks of an unfinished extraction, under ``<cache_dir>/<key>.partial/``.

    Each chunk is one safetensors file holding ``indices`` (prompt positions) and one
    ``[prompt, layer, d_model]`` tensor per hook, written atomically; a chunk is either whole
    or absent, and its file name ends with the first 16 hex digits of its SHA-256, checked when
    it is read (a chunk that fails is removed, with a warning, and recomputed). ``key.json`` (a
    ``KeyedFolder`` record) holds the key and its fields, and a folder made for other settings
    is discarded rather than mixed in.

    Creating a ``PartialRun`` takes the entry's file lock (waiting while another process holds
    it) and keeps it until ``finish`` or ``close``; ``cached`` is the finished entry when the
    other process completed it meanwhile.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], manifest: Manifest | Mapping[str, Any]):
        manifest = Manifest.from_dict(manifest, func="PartialRun")
        self.key = manifest.key()
        self.fields = manifest.key_fields()
        self._keyed = KeyedFolder(
            Path(cache_dir) / f"{self.key}.partial", self.key, record="key.json"
        )
        self.folder = self._keyed.folder
        self._lock = entry_lock(cache_dir, self.key)
        waited = _acquire(self._lock, f"the cache entry {Path(cache_dir) / self.key}")
        try:
            # The caller looked the entry up before the lock; only a process that held it can
            # have written it since.
            self.cached = load_cached(cache_dir, manifest) if waited else None
            if self.cached is None:
                self._open()
        except BaseException:
            self.close()
            raise
        if self.cached is not None:
            self.close()

    def _open(self) -> None:
        if self._keyed.state() == "stale":
            log.warning(
                "discarding partial extraction %s: it was made for other settings", self.folder
            )
        self._keyed.begin(fields=self.fields)  # refuses a folder holding files it did not write

    def close(self) -> None:
        """Releases the entry's lock (``finish`` does too); the chunks stay for a later resume."""
        if self._lock.is_locked:
            self._lock.release()

    def chunks(self) -> list[Path]:
        """Returns the finished chunk files."""
        return sorted(self.folder.glob("chunk-*.safetensors"))

    def _read(self, f: Path) -> dict[str, Tensor] | None:
        """Returns a chunk's tensors, or None (and removes it) when it fails its checksum."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        data = f.read_bytes()
        if not _CHUNK.fullmatch(f.name) or f.name[-28:-12] != hashlib.sha256(data).hexdigest()[:16]:
            problem = "does not match the checksum in its name"
        else:
            try:
                return load(data)
            except SafetensorError as e:
                problem = f"is unreadable ({e})"
        log.warning("removing partial chunk %s: it %s; it will be recomputed", f, problem)
        f.unlink(missing_ok=True)
        return None

    def done(self) -> set[int]:
        """Returns the prompt positions already computed (removing chunks that fail their
        checksum)."""
        out: set[int] = set()
        for f in self.chunks():
            chunk = self._read(f)
            if chunk is not None:
                out.update(chunk["indices"].tolist())
        return out

    def write(
        self, indices: Sequence[int], tensors: Mapping[str, Float[Tensor, "prompt layer d_model"]]
    ) -> Path:
        """Writes one finished chunk atomically and returns its file."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        payload = {hook: t.detach().to("cpu").contiguous() for hook, t in tensors.items()}
        payload["indices"] = idx
        data = safetensors_bytes(payload)
        path = (
            self.folder
            / f"chunk-{int(idx.min()):07d}-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
        )
        return atomic_write_bytes(path, data)

    def assemble(
        self, n_prompts: int, hooks: Sequence[str]
    ) -> dict[str, Float[Tensor, "prompt layer d_model"]]:
        """Returns ``{hook: [prompt, layer, d_model]}`` in prompt order, from every chunk.

        Raises:
            RuntimeError: If some prompt is missing or appears in two chunks.
        """
        out: dict[str, Tensor] = {}
        seen = torch.zeros(n_prompts, dtype=torch.long)
        for f in self.chunks():
            chunk = self._read(f)
            if chunk is None:
                continue
            idx = chunk["indices"]
            seen[idx] += 1
            for hook in hooks:
                if hook not in out:
                    out[hook] = torch.empty(
                        (n_prompts, *chunk[hook].shape[1:]), dtype=chunk[hook].dtype
                    )
                out[hook][idx] = chunk[hook]
        if not bool((seen == 1).all()):
            self.close()
            raise RuntimeError(
                f"the partial extraction {self.folder} does not cover every prompt exactly once"
            )
        return out

    def finish(self, acts: ActivationSet) -> Path:
        """Saves the finished set as the cache entry, removes the partial folder, releases the
        lock."""
        try:
            final = save_activations(acts, self.folder.parent / self.key)
            shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self.close()
        return final
