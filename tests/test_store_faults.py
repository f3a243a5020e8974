"""Fault injection on the activation store: nothing lost, nothing stale, nothing silently wrong.

Each test breaks something for real (a folder of the user's, truncated or flipped bytes, an
edited manifest, SIGKILL in the middle of a write, two processes on one cache entry) and
checks that the toolkit refuses, recomputes with one warning, or waits, against a reference
computed without the fault.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from persona_geometry import (
    ActivationSet,
    builtin_personas,
    builtin_questions,
    extract_activations,
)
from persona_geometry.activations import CorruptFileError, save_activations
from persona_geometry.pipeline.cli import main
from persona_geometry.store import entry_lock

from conftest import ForwardCounter

PERSONAS = builtin_personas().select(["helpful_assistant", "librarian", "comedian"])
QUESTIONS = [builtin_questions()[i] for i in (1, 4, 9, 15)]


@pytest.fixture(scope="module")
def reference(qwen):
    """The activations computed once, with no cache and no fault."""
    return extract_activations(qwen, PERSONAS, QUESTIONS, progress=False)


def _small_set(value: float = 0.0) -> ActivationSet:
    return ActivationSet(
        {"resid_post": torch.full((2, 2, 2, 8), value)}, personas=builtin_personas()[:2], questions=["a?", "b?"],
        layers=[0, 1], n_tokens=torch.ones(2, 2, dtype=torch.long),
    )


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- 1. never delete a folder the toolkit did not write ---------------------------------------
def test_saving_onto_a_folder_of_other_files_is_refused_and_keeps_them(tmp_path):
    target = tmp_path / "P"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="'path' parameter of save_activations"):
        save_activations(_small_set(), target)
    assert (target / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P"]  # no temporary folder left behind
    save_activations(_small_set(1.0), target, overwrite=True)  # the explicit case
    assert sorted(p.name for p in target.iterdir()) == ["activations.safetensors", "manifest.json"]


def test_an_activation_set_or_an_empty_folder_is_replaced(tmp_path):
    save_activations(_small_set(0.0), tmp_path / "a")
    save_activations(_small_set(2.0), tmp_path / "a")
    assert float(ActivationSet.load(tmp_path / "a")["resid_post"][0, 0, 0, 0]) == 2.0
    (tmp_path / "empty").mkdir()
    save_activations(_small_set(3.0), tmp_path / "empty")
    assert float(ActivationSet.load(tmp_path / "empty")["resid_post"][0, 0, 0, 0]) == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]


def test_the_working_directory_a_file_or_a_link_are_never_replaced(tmp_path, monkeypatch):
    (tmp_path / "precious.txt").write_text("keep")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for path in (".", "..", str(tmp_path)):
        with pytest.raises(FileExistsError, match="working directory"):
            save_activations(_small_set(), path, overwrite=True)
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path, tmp_path / "link")
    for path in (tmp_path / "file", tmp_path / "link"):
        with pytest.raises(FileExistsError, match="a file or a link"):
            save_activations(_small_set(), path, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "x"


def test_cli_extract_refuses_a_foreign_out_folder_before_loading_the_model(tmp_path, monkeypatch, capsys):
    target = tmp_path / "P"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    # A model path that does not exist: the refusal must come first, without touching it.
    status = main(["extract", "--model", str(tmp_path / "no-model"), "--out", str(target), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "'--out' parameter of extract" in err[0]
    monkeypatch.chdir(target)
    status = main(["extract", "--model", str(tmp_path / "no-model"), "--out", ".", "--overwrite", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "working directory" in err[0]
    assert sorted(p.name for p in target.iterdir()) == ["precious.txt"]


def test_sigkill_while_replacing_a_set_leaves_the_old_or_the_new_one(tmp_path):
    """A process saving sets of 4 MB over and over is killed at random moments."""
    target = tmp_path / "acts"
    save_activations(_small_set(0.0), target)
    script = textwrap.dedent(f"""
        import torch
        from persona_geometry import ActivationSet, builtin_personas
        from persona_geometry.activations import save_activations
        print("ready", flush=True)
        for i in range(1, 10_000):
            acts = ActivationSet({{"resid_post": torch.full((2, 2, 2, 2**18), float(i))}},
                                 personas=builtin_personas()[:2], questions=["a?", "b?"], layers=[0, 1],
                                 n_tokens=torch.ones(2, 2, dtype=torch.long))
            save_activations(acts, {str(target)!r})
    """)
    for delay in (0.1, 0.4, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            acts = ActivationSet.load(target)  # verifies the checksums: a whole set, never a mixture
        else:  # killed between the two renames: the old set sits, whole, beside the target
            (old,) = tmp_path.glob(".acts.*.old/acts")
            acts = ActivationSet.load(old)
            os.replace(old, target)
        assert acts["resid_post"].unique().numel() == 1
        for leftover in tmp_path.glob(".acts.*"):  # what SIGKILL left: temporary folders only
            assert leftover.suffix in (".tmp", ".old")
            subprocess.run(["rm", "-rf", str(leftover)], check=True)


# --- 3. checksums: a corrupt entry is recomputed with one warning, never used -----------------
@pytest.mark.parametrize("fault", ["truncate", "empty", "flip", "swap_labels", "swap_labels_and_checksum"])
def test_a_corrupt_cache_entry_is_recomputed_with_one_warning(qwen, reference, tmp_path, caplog, fault):
    first = extract_activations(qwen, PERSONAS, QUESTIONS, cache_dir=tmp_path, progress=False)
    assert torch.equal(first["resid_post"], reference["resid_post"])
    entry = tmp_path / first.manifest["cache_key"]
    tensors, manifest = entry / "activations.safetensors", entry / "manifest.json"
    data = bytearray(tensors.read_bytes())
    if fault == "truncate":
        tensors.write_bytes(data[: len(data) // 2])
    elif fault == "empty":
        tensors.write_bytes(b"")
    elif fault == "flip":  # 16 bytes of mantissa at the end of the data: still a readable file
        for i in range(len(data) - 2000, len(data) - 1984):
            data[i] ^= 0x5A
        tensors.write_bytes(bytes(data))
    else:
        meta = json.loads(manifest.read_text())
        meta["personas"][0]["name"], meta["personas"][1]["name"] = meta["personas"][1]["name"], meta["personas"][0]["name"]
        if fault == "swap_labels_and_checksum":  # a hand edit that also fixed the checksum up
            from persona_geometry.activations import _labels_hash

            meta["checksums"]["labels"] = _labels_hash(meta)
        manifest.write_text(json.dumps(meta))
    if fault != "swap_labels_and_checksum":
        with pytest.raises(CorruptFileError):
            ActivationSet.load(entry)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = extract_activations(qwen, PERSONAS, QUESTIONS, cache_dir=tmp_path, progress=False)
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    assert str(entry) in _warnings(caplog)[0]
    assert again.personas.names == PERSONAS.names
    assert torch.equal(again["resid_post"], reference["resid_post"])
    assert torch.equal(ActivationSet.load(entry)["resid_post"], reference["resid_post"])  # the entry is whole again


@pytest.mark.parametrize("fault", ["truncate", "flip"])
def test_a_corrupt_partial_chunk_is_recomputed(qwen, tmp_path, caplog, fault):
    kw = dict(chunk_prompts=4, max_batch_size=2, progress=False)  # 12 prompts: 3 chunks
    with ForwardCounter(qwen) as full:
        reference = extract_activations(qwen, PERSONAS, QUESTIONS, **kw)  # same batches: bitwise comparable
    with ForwardCounter(qwen, fail_on=full.calls - 1), pytest.raises(KeyboardInterrupt):
        extract_activations(qwen, PERSONAS, QUESTIONS, cache_dir=tmp_path, **kw)
    chunks = sorted(next(tmp_path.glob("*.partial")).glob("chunk-*.safetensors"))
    assert len(chunks) >= 2
    data = bytearray(chunks[0].read_bytes())
    if fault == "truncate":
        chunks[0].write_bytes(data[:100])
    else:
        data[-3] ^= 0xFF
        chunks[0].write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING), ForwardCounter(qwen) as counter:
        resumed = extract_activations(qwen, PERSONAS, QUESTIONS, cache_dir=tmp_path, **kw)
    assert len(_warnings(caplog)) == 1 and "chunk" in _warnings(caplog)[0]
    assert 0 < counter.calls < full.calls  # the corrupt chunk and the missing one, not the whole run
    assert torch.equal(resumed["resid_post"], reference["resid_post"])


# --- 6. one process at a time per cache entry --------------------------------------------------
def _extract_cmd(model: Path, out: Path, cache: Path) -> list[str]:
    inputs = cache.parent
    if not (inputs / "personas.yaml").is_file():
        PERSONAS.save(inputs / "personas.yaml")
        (inputs / "questions.txt").write_text("\n".join(QUESTIONS) + "\n")
    return [sys.executable, "-m", "persona_geometry.pipeline.cli", "extract", "--model", str(model), "--device", "cpu",
            "--dtype", "float32", "--personas", str(inputs / "personas.yaml"), "--questions", str(inputs / "questions.txt"),
            "--out", str(out), "--cache-dir", str(cache), "-v"]  # fmt: skip


def test_a_second_process_waits_for_the_entry_lock_then_reuses_the_result(qwen, tiny_qwen_path, tmp_path):
    cache = tmp_path / "cache"
    cmd = _extract_cmd(tiny_qwen_path, tmp_path / "out", cache)
    # The same extraction in this process, hence the key the child will lock.
    expected = extract_activations(qwen, PERSONAS, QUESTIONS, progress=False)
    key = expected.manifest["cache_key"]
    lock = entry_lock(cache, key)
    lock.acquire()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        waited = ""
        while "waiting for another process" not in waited:  # the child blocks on the lock
            line = proc.stderr.readline()
            assert line, f"the child ended without waiting: {waited}"
            waited += line
        # Meanwhile this process finishes the entry, as another extraction would.
        expected.save(cache / key)
    finally:
        lock.release()
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, rest
    assert "extract (hf)" not in rest  # no progress bar: nothing was computed after the wait
    assert torch.equal(ActivationSet.load(tmp_path / "out")["resid_post"], expected["resid_post"])


def test_two_concurrent_extractions_on_one_cache_both_succeed_with_equal_results(tiny_qwen_path, tmp_path):
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(_extract_cmd(tiny_qwen_path, tmp_path / f"out{i}", cache), stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    a, b = (ActivationSet.load(tmp_path / f"out{i}") for i in range(2))
    assert torch.equal(a["resid_post"], b["resid_post"])
    assert not list(cache.glob("*.partial"))  # no stale partial folder
    assert len([p for p in cache.iterdir() if p.is_dir() and p.name != ".locks"]) == 1


# --- 9. file modes and byte-identical files ---------------------------------------------------
def test_safetensors_files_get_the_usual_mode_and_the_same_bytes_in_every_process(tmp_path):
    script = textwrap.dedent("""
        import os, sys, torch
        from persona_geometry import ActivationSet, Persona, PersonaSet
        from persona_geometry.activations import save_activations
        os.umask(0o022)
        personas = PersonaSet(Persona(name=f"p{i}", system_prompt=f"You are {i}.") for i in range(6))
        acts = ActivationSet({h: torch.arange(6 * 2 * 3 * 4, dtype=torch.float32).reshape(6, 2, 3, 4) + k
                              for k, h in enumerate(["resid_post", "resid_pre", "mlp_out", "attn_out", "resid_mid"])},
                             personas=personas, questions=["a?", "b?"], layers=[0, 1, 2],
                             n_tokens=torch.ones(6, 2, dtype=torch.long))
        save_activations(acts, sys.argv[1])
    """)
    for i, seed in enumerate(("1", "2")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"s{i}")], check=True, env=env)
    files = [tmp_path / f"s{i}" / "activations.safetensors" for i in range(2)]
    assert files[0].read_bytes() == files[1].read_bytes()
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644
        assert (f.parent / "manifest.json").stat().st_mode & 0o777 == 0o644
        assert f.parent.stat().st_mode & 0o777 == 0o755
