"""Cached, resumable outputs: a folder that belongs to one input key, finished or not.

Three parts of the toolkit keep outputs that can be reused or resumed: the chunks of an
unfinished extraction (``store.PartialRun``), the stages and units of a study
(``pipeline.study``) and a LoRA run's checkpoints. Each needs the same answers about a folder —
were these outputs made from these inputs, are they finished, may a stale folder be cleared —
and ``KeyedFolder`` gives them once: a small JSON record beside the outputs holds the input key
and whether the outputs are finished.

The record is written atomically; the folder is only ever removed when its record says it was
made for other inputs (or the caller forces a fresh start), never when it holds files without a
record, since those were not written here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from persona_geometry._io import atomic_write_json
from persona_geometry._validation import invalid

__all__ = ["KeyedFolder", "FolderState"]

log = logging.getLogger(__name__)

FolderState = Literal["absent", "finished", "unfinished", "stale", "foreign"]


class KeyedFolder:
    """A folder of outputs made from the inputs that ``key`` identifies.

    States (``state()``):
        ``"absent"``: no folder, or an empty one; ``"finished"``: the record carries ``key`` and
        says done; ``"unfinished"``: the record carries ``key`` but the outputs are not done (an
        interrupted run: resume it); ``"stale"``: the record carries another key; ``"foreign"``:
        the folder holds files but no record.

    Args:
        folder: The output folder.
        key: The stable hash of everything the outputs depend on.
        record: The record's file name inside ``folder``.
    """

    def __init__(self, folder: str | os.PathLike[str], key: str, *, record: str = ".key.json"):
        if not isinstance(key, str) or not key:
            invalid("key", "KeyedFolder", "a non-empty str", key, exc=TypeError)
        self.folder = Path(folder)
        self.key = key
        self.path = self.folder / record

    def __repr__(self) -> str:
        return f"KeyedFolder({str(self.folder)!r}, key={self.key!r}, state={self.state()!r})"

    def info(self) -> dict[str, Any]:
        """Returns the stored record (``{}`` when there is none or it cannot be read)."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def state(self) -> FolderState:
        """Returns what the folder holds for this key (see the class docstring)."""
        if not self.folder.is_dir():
            return "absent"
        record = self.info()
        if not record:
            # A record that cannot be read counts as one made elsewhere: its folder is ours.
            if self.path.exists():
                return "stale"
            return "foreign" if any(self.folder.iterdir()) else "absent"
        if record.get("key") != self.key:
            return "stale"
        # Records written before "done" existed were only written once the outputs were finished.
        return "finished" if record.get("done", True) else "unfinished"

    def done(self) -> bool:
        """Whether the folder holds finished outputs for this key."""
        return self.state() == "finished"

    def begin(self, *, force: bool = False, **info: Any) -> bool:
        """Prepares the folder for outputs of this key; returns True when it resumes earlier work.

        A folder made for other inputs (or any of ours, with ``force``) is removed first, so
        outputs of two settings are never mixed; an unfinished folder with this key is kept, so
        the caller resumes from what it holds. ``info`` is stored in the record.

        Raises:
            FileExistsError: If the folder holds files without a record (not written here).
        """
        state = self.state()
        if state == "foreign":
            invalid("folder", "KeyedFolder.begin",
                    "absent, empty or a folder this toolkit wrote (with its record)",
                    str(self.folder), exc=FileExistsError)  # fmt: skip
        resume = state in ("finished", "unfinished") and not force
        if not resume and state != "absent":
            log.info(
                "removing %s: made for other inputs%s",
                self.folder,
                " (forced)" if force and state != "stale" else "",
            )
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (resume and state == "finished"):
            atomic_write_json(self.path, {"key": self.key, "done": False, **info})
        return resume

    def finish(self, **info: Any) -> None:
        """Records that the outputs for this key are finished, with ``info`` beside the key."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"key": self.key, "done": True, **info})
