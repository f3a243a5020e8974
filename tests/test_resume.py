"""KeyedFolder (cached, resumable outputs) and the typed activation Manifest."""

from __future__ import annotations

import json

import pytest

from persona_geometry.manifest import Manifest
from persona_geometry.provenance import stable_hash
from persona_geometry.resume import KeyedFolder
from persona_geometry.store import KEY_FIELDS, cache_key


def test_a_keyed_folder_resumes_its_own_work_and_clears_other_inputs(tmp_path):
    folder = tmp_path / "unit"
    run = KeyedFolder(folder, "k1")
    assert run.state() == "absent" and not run.done()
    assert run.begin(note="first") is False  # nothing to resume
    (folder / "checkpoint").write_text("step 3")
    assert run.state() == "unfinished" and run.info() == {"key": "k1", "done": False, "note": "first"}

    assert KeyedFolder(folder, "k1").begin() is True  # same inputs: the checkpoint is kept
    assert (folder / "checkpoint").read_text() == "step 3"
    run.finish(files=["checkpoint"])
    assert KeyedFolder(folder, "k1").done() and run.info()["files"] == ["checkpoint"]

    other = KeyedFolder(folder, "k2")
    assert other.state() == "stale"
    assert other.begin() is False and not (folder / "checkpoint").exists()  # other inputs: cleared
    assert KeyedFolder(folder, "k1").state() == "stale"


def test_force_starts_over_and_a_foreign_folder_is_never_deleted(tmp_path):
    folder = tmp_path / "unit"
    run = KeyedFolder(folder, "k")
    run.begin()
    (folder / "old").write_text("x")
    run.finish()
    assert run.begin(force=True) is False and not (folder / "old").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="'folder' parameter of KeyedFolder.begin"):
        KeyedFolder(foreign, "k").begin(force=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert KeyedFolder(tmp_path / "empty", "k").state() == "absent"


def test_a_record_without_done_counts_as_finished(tmp_path):
    # Stage records written before "done" existed were only written once a stage had finished.
    (tmp_path / ".key.json").write_text(json.dumps({"key": "k"}))
    assert KeyedFolder(tmp_path, "k").done()


def _fields(**changes):
    fields = {
        "format_version": 1, "model_id": "m", "revision": None, "weights_id": "w", "dtype": "float32",
        "engine": "hf", "hooks": ["resid_post"], "layers": [0, 1], "chat_template_hash": "c",
        "persona_hash": "p", "question_hash": "q", "prompt_ids_hash": "i", "layer_template": "model.layers.{num}",
        "share_prefix": True,
    }  # fmt: skip
    return {**fields, **changes}


def test_manifest_key_is_the_hash_of_its_key_fields_and_it_reads_like_a_dict():
    raw = {**_fields(), "created": "2026-01-01", "batch_tokens": 4096}
    m = Manifest.from_dict(raw)
    # The key is the stable hash of exactly the key fields (a hand computation of the same rule).
    assert m.key() == stable_hash({k: raw[k] for k in KEY_FIELDS}, length=24) == cache_key(raw) == cache_key(m)
    assert m.key() == Manifest.from_dict({**raw, "created": "later", "batch_tokens": 1}).key()
    assert m.key() != Manifest.from_dict({**raw, "dtype": "bfloat16"}).key()
    assert m.to_dict() == raw and dict(m) == raw and len(m) == len(raw)
    assert m.dtype == "float32" and m["created"] == "2026-01-01" and m.get("missing") is None
    assert "batch_tokens" in m and "missing" not in m
    r = m.replace(dtype="bfloat16", cache_key="abc")
    assert r.dtype == "bfloat16" and r["cache_key"] == "abc" and m.dtype == "float32"
    with pytest.raises(ValueError, match=r"'manifest' parameter of cache_key .*missing \['dtype'\]"):
        cache_key({k: v for k, v in raw.items() if k != "dtype"})
