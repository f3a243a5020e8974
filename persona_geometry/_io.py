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

from persona_geometry._validation import invalid


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


def check_replaceable(
    path: str | os.PathLike[str],
    *,
    owned: Callable[[Path], bool] | None = None,
    overwrite: bool = False,
    param: str = "path",
    func: str = "atomic_dir",
) -> Path:
    """Returns ``path`` after checking that a folder may be written there without losing anything.

    A folder may be replaced when it does not exist, is empty, or ``owned(path)`` says the
    toolkit wrote it (e.g. an activation set: only its own two files). Anything else (a folder
    holding other files, a file, the working directory or one above it) is refused, so nothing
    the toolkit did not write is ever deleted. ``overwrite=True`` allows replacing a foreign
    folder, never a file, the working directory or a folder above it.

    Raises:
        FileExistsError: If ``path`` holds something that may not be replaced.
        PermissionError: If ``path`` would be created in a folder that cannot be written.
    """
    path = Path(path)
    if not os.path.lexists(path):
        check_output_path(path, param=param, func=func)
        return path
    if path.is_symlink() or not path.is_dir():
        invalid(
            param, func, "a folder path (it holds a file or a link)", str(path), exc=FileExistsError
        )
    resolved = path.resolve()
    if resolved == Path(resolved.anchor) or Path.cwd().resolve().is_relative_to(resolved):
        invalid(
            param,
            func,
            "a folder other than the working directory and the folders above it",
            str(path),
            exc=FileExistsError,
        )
    if overwrite or not any(path.iterdir()) or (owned is not None and owned(path)):
        return path
    invalid(
        param,
        func,
        "a new or empty folder, or one the toolkit wrote (pass overwrite to replace another "
        "folder)",
        f"{path}, which holds files the toolkit did not write",
        exc=FileExistsError,
    )


def check_output_path(
    path: str | os.PathLike[str], *, param: str, func: str, folder: bool = False
) -> Path:
    """Returns ``path`` after checking that a file (or, with ``folder``, a folder) can be written
    there.

    Checked before any work, so a bad output path fails in one line, not after the work: the
    path must not be a folder (for a file) or a file (for a folder), and its nearest existing
    ancestor must be a writable folder (not a file).

    Raises:
        IsADirectoryError: If a file is wanted and ``path`` is a folder.
        FileExistsError: If a folder is wanted and ``path`` is a file.
        NotADirectoryError: If a folder above ``path`` is a file.
        PermissionError: If the nearest existing folder is read-only.
    """
    path = Path(path)
    if folder and os.path.lexists(path) and not path.is_dir():
        invalid(param, func, "a folder path", f"{path}, which is a file", exc=FileExistsError)
    if not folder and path.is_dir():
        invalid(param, func, "a file path", f"{path}, which is a folder", exc=IsADirectoryError)
    parent = next(
        (p for p in path.absolute().parents if os.path.lexists(p)), Path(path.absolute().anchor)
    )
    if not parent.is_dir():
        invalid(
            param,
            func,
            "a path below folders",
            f"{path} ({parent} is a file)",
            exc=NotADirectoryError,
        )
    probe = path if path.is_dir() else parent
    if not os.access(probe, os.W_OK):
        invalid(
            param,
            func,
            "a path in a writable folder",
            f"{path} ({probe} is read-only)",
            exc=PermissionError,
        )
    return path


@contextmanager
def atomic_dir(
    path: str | os.PathLike[str],
    *,
    owned: Callable[[Path], bool] | None = None,
    overwrite: bool = False,
    param: str = "path",
    func: str = "atomic_dir",
) -> Iterator[Path]:
    """Yields a temporary folder beside ``path``; it replaces ``path`` if the block succeeds.

    ``path`` is checked with ``check_replaceable`` before the block runs and again before the
    replacement: a folder the toolkit did not write is never deleted. The old folder is renamed
    aside, the new one renamed into place, and only then is the old one removed, so an
    interrupted write leaves the old folder (under ``path`` or, renamed, beside it) or the new
    one, never a mixture.

    Raises:
        FileExistsError: If ``path`` may not be replaced (see ``check_replaceable``).
    """
    path = Path(path)
    check_replaceable(path, owned=owned, overwrite=overwrite, param=param, func=func)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_dir
        os.chmod(tmp_dir, 0o777 & ~_umask())
        for f in sorted(tmp_dir.rglob("*")):
            if f.is_file() and not f.is_symlink():
                # Writers that create their own files (safetensors: 0600) get the usual mode too.
                os.chmod(f, 0o666 & ~_umask())
                _fsync_file(f)
        for d in sorted({f.parent for f in tmp_dir.rglob("*")} | {tmp_dir}):
            _fsync_dir(d)
        check_replaceable(path, owned=owned, overwrite=overwrite, param=param, func=func)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp_dir, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically and returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, default: Callable[[Any], Any] | None = None
) -> Path:
    """Writes ``obj`` as indented JSON to ``path`` atomically and returns the path."""
    return atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=default) + "\n"
    )


def atomic_write_jsonl(
    path: str | os.PathLike[str], rows: Iterator[dict[str, Any]] | list[dict[str, Any]]
) -> Path:
    """Writes one JSON object per line to ``path`` atomically and returns the path."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_jsonl(
    path: str | os.PathLike[str], *, param: str = "path", func: str = "read_jsonl"
) -> list[dict[str, Any]]:
    """Returns the JSON objects stored one per line in ``path``.

    Raises:
        ValueError: If the file is missing, a folder, not UTF-8, or a line is not one JSON
            object (one line naming the file and the line number).
    """
    from persona_geometry._serialization import one_line, read_text_file

    text = read_text_file(path, param=param, func=func)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            invalid(
                param,
                func,
                "a JSONL file (one JSON object per line)",
                f"{path}, line {number}: {one_line(e)}",
            )
        if not isinstance(row, dict):
            invalid(
                param,
                func,
                "a JSONL file of JSON objects",
                f"{path}, line {number}: a {type(row).__name__}",
            )
        rows.append(row)
    return rows
