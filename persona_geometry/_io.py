"""Atomic file writes: a reader never sees a half-written file, even after a crash.

The data is written to a temporary file beside the target, flushed to the disk (``fsync``),
renamed onto the target, and the folder's entry flushed in turn; so after a crash the target
holds either the old content or the whole new content.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` if the block succeeds.

    The temporary file lives in the same folder so that the final ``os.replace`` is atomic on
    POSIX file systems. On any exception the temporary file is removed and ``path`` is left as
    it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates files readable by the owner only; give the result the mode any new
        # file would get, so reports and figures can be shared as usual.
        os.chmod(tmp_path, 0o666 & ~_umask())
        # Without fsync a crash after the rename can leave the new name pointing at empty or
        # partial data (the rename reaches the journal before the blocks reach the disk).
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary folder beside ``path``; it replaces ``path`` if the block succeeds.

    An existing ``path`` is removed only once the new folder is complete, so an interrupted
    write leaves either the old folder or nothing, never a mixture.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_dir
        os.chmod(tmp_dir, 0o777 & ~_umask())
        for f in sorted(tmp_dir.rglob("*")):
            if f.is_file() and not f.is_symlink():
                _fsync_file(f)
        for d in sorted({f.parent for f in tmp_dir.rglob("*")} | {tmp_dir}):
            _fsync_dir(d)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp_dir, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


def _fsync_file(path: Path) -> None:
    """Flushes a file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flushes a folder's entries (a rename into it) to the disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the data itself is flushed
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes ``text`` to ``path`` atomically and returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, default: Callable[[Any], Any] | None = None) -> Path:
    """Writes ``obj`` as indented JSON to ``path`` atomically and returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=default) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> Path:
    """Writes one JSON object per line to ``path`` atomically and returns the path."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Returns the JSON objects stored one per line in ``path``."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
