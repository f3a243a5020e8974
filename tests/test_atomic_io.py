"""Atomic writes flush the data and the folder entry to the disk before and after the rename."""

from __future__ import annotations

import os

from persona_geometry import _io


def _record_fsyncs(monkeypatch):
    """Returns a list that fills with ("fsync", path) and ("replace", dst) events in call order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(_io.os, "fsync", fsync)
    monkeypatch.setattr(_io.os, "replace", replace)
    return events


def test_atomic_file_is_flushed_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = _record_fsyncs(monkeypatch)
    target = tmp_path / "out.json"
    _io.atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert os.path.basename(events[0][1]).startswith(".out.json.")  # the temp file, before the rename
    assert events[2][1] == str(tmp_path)  # the folder, after the rename


def test_atomic_folder_flushes_every_file_before_the_rename(tmp_path, monkeypatch):
    events = _record_fsyncs(monkeypatch)
    target = tmp_path / "set"
    with _io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert (target / "sub" / "b.txt").read_text() == "b"
    before = [p for k, p in events[: [k for k, _ in events].index("replace")]]
    assert {os.path.basename(p) for p in before} >= {"a.txt", "b.txt", "sub"}
    assert events[-1] == ("fsync", str(tmp_path))
