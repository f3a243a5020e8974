"""The activation store: round trip, content-addressed cache, mismatches recomputed, resume after a crash."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from persona_geometry import (
    ActivationSet,
    builtin_personas,
    builtin_questions,
    extract_activations,
    load_model,
)
from persona_geometry.store import KEY_FIELDS, PartialRun, cache_key

from conftest import ForwardCounter

PERSONAS = builtin_personas().select(["helpful_assistant", "librarian", "comedian"])
QUESTIONS = [builtin_questions()[i] for i in (1, 4, 9, 15)]


def test_save_and_load_round_trip_without_unpickling(qwen, tmp_path, monkeypatch):
    acts = extract_activations(qwen, PERSONAS, QUESTIONS[:2], hooks=["resid_post", "resid_pre"], layers=[0, 2], progress=False)
    folder = acts.save(tmp_path / "acts")
    assert sorted(p.name for p in folder.iterdir()) == ["activations.safetensors", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    for field in ("model_id", "weights_id", "dtype", "engine", "chat_template_hash", "persona_hash", "question_hash", "prompt_ids_hash", "package_versions"):
        assert field in manifest["provenance"]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = ActivationSet.load(folder)
    assert loaded.hooks == acts.hooks and loaded.layers == acts.layers
    assert loaded.personas == acts.personas and loaded.questions == acts.questions
    for hook in acts:
        assert torch.equal(loaded[hook], acts[hook])
    assert torch.equal(loaded.n_tokens, acts.n_tokens)
    assert loaded.manifest == json.loads(json.dumps(acts.manifest))


def test_bfloat16_tensors_round_trip(tmp_path):
    x = torch.randn(2, 3, 2, 8).to(torch.bfloat16)
    acts = ActivationSet(
        {"resid_post": x}, personas=builtin_personas()[:2], questions=["a?", "b?", "c?"], layers=[1, 5],
        n_tokens=torch.ones(2, 3, dtype=torch.long), manifest={"note": "hand-made"},
    )
    loaded = ActivationSet.load(acts.save(tmp_path / "bf16"))
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded["resid_post"], x)


def test_load_rejects_what_it_cannot_trust(tmp_path):
    with pytest.raises(FileNotFoundError, match="'path' parameter of ActivationSet.load"):
        ActivationSet.load(tmp_path / "missing")
    acts = ActivationSet(
        {"resid_post": torch.zeros(1, 1, 1, 4)}, personas=builtin_personas()[:1], questions=["q?"], layers=[0],
        n_tokens=torch.ones(1, 1, dtype=torch.long),
    )
    folder = acts.save(tmp_path / "a")
    meta = json.loads((folder / "manifest.json").read_text())
    meta["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'path' parameter of ActivationSet.load"):
        ActivationSet.load(folder)


def test_cache_hit_loads_without_a_forward_pass(qwen, tmp_path):
    first = extract_activations(qwen, PERSONAS, QUESTIONS, cache_dir=tmp_path, progress=False)
    entries = [p for p in tmp_path.iterdir() if p.name != ".locks"]
    assert [p.name for p in entries] == [first.manifest["cache_key"]]  # no partial folder left
    with ForwardCounter(qwen) as counter:
        second = extract_activations(qwen, PERSONAS, QUESTIONS, cache_dir=tmp_path, progress=False)
    assert counter.calls == 0
    assert torch.equal(second["resid_post"], first["resid_post"])
    assert second.manifest["cache_key"] == first.manifest["cache_key"]


def test_a_different_extraction_is_recomputed_never_reused(qwen, tiny_qwen_path, tiny_llama_path, tmp_path):
    base = extract_activations(qwen, PERSONAS, QUESTIONS, cache_dir=tmp_path, progress=False)
    variants = {
        "personas": dict(model=qwen, personas=PERSONAS.select(["helpful_assistant", "librarian"])),
        "questions": dict(model=qwen, questions=QUESTIONS[:3]),
        "layers": dict(model=qwen, layers=[1]),
        "dtype": dict(model=load_model(tiny_qwen_path, dtype="bfloat16", device="cpu")),
        "model": dict(model=load_model(tiny_llama_path, dtype="float32", device="cpu")),
    }
    keys = {base.manifest["cache_key"]}
    for name, kw in variants.items():
        handle = kw.pop("model")
        kw.setdefault("personas", PERSONAS)
        kw.setdefault("questions", QUESTIONS)
        with ForwardCounter(handle) as counter:
            acts = extract_activations(handle, cache_dir=tmp_path, progress=False, **kw)
        assert counter.calls > 0, name
        keys.add(acts.manifest["cache_key"])
    assert len(keys) == 1 + len(variants)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".locks") == sorted(keys)


def test_an_entry_whose_manifest_does_not_match_is_recomputed(qwen, tmp_path):
    first = extract_activations(qwen, PERSONAS, QUESTIONS[:2], cache_dir=tmp_path, progress=False)
    entry = tmp_path / first.manifest["cache_key"]
    meta = json.loads((entry / "manifest.json").read_text())
    meta["provenance"]["weights_id"] = "sha:someothermodel"
    (entry / "manifest.json").write_text(json.dumps(meta))
    with ForwardCounter(qwen) as counter:
        again = extract_activations(qwen, PERSONAS, QUESTIONS[:2], cache_dir=tmp_path, progress=False)
    assert counter.calls > 0
    assert torch.equal(again["resid_post"], first["resid_post"])
    assert json.loads((entry / "manifest.json").read_text())["provenance"]["weights_id"] == qwen.weights_id


@pytest.mark.parametrize("pack", [False, None])
def test_an_interrupted_run_resumes_and_ends_with_the_same_tensor(qwen, tmp_path, pack):
    # 12 prompts: 3 chunks of 2 batches (or packs)
    kw = dict(chunk_prompts=4, max_batch_size=2, pack=pack, progress=False)
    uninterrupted = extract_activations(qwen, PERSONAS, QUESTIONS, **kw)
    with ForwardCounter(qwen, fail_on=4) as counter, pytest.raises(KeyboardInterrupt):
        extract_activations(qwen, PERSONAS, QUESTIONS, cache_dir=tmp_path, **kw)
    partial = next(tmp_path.glob("*.partial"))
    assert len(list(partial.glob("chunk-*.safetensors"))) == 1  # the first chunk finished, the second did not
    assert not list(partial.glob(".*.tmp"))  # no half-written file
    with ForwardCounter(qwen) as counter:
        resumed = extract_activations(qwen, PERSONAS, QUESTIONS, cache_dir=tmp_path, **kw)
    # Only the two remaining chunks, after the shared-prefix pass of the padded engine (packs hold their prefixes).
    assert counter.calls == (1 if pack is False else 0) + 4
    assert torch.equal(resumed["resid_post"], uninterrupted["resid_post"])
    assert not partial.exists() and (tmp_path / resumed.manifest["cache_key"]).is_dir()


def test_a_partial_folder_made_for_other_settings_is_discarded(qwen, tmp_path):
    manifest = {**dict.fromkeys(KEY_FIELDS, "x"), "format_version": 1, "layers": [0], "share_prefix": False}
    run = PartialRun(tmp_path, manifest)
    run.write([0, 1], {"resid_post": torch.ones(2, 1, 4)})
    (run.folder / "key.json").write_text(json.dumps({**run.fields, "dtype": "other"}))
    run.close()  # a PartialRun holds the entry's lock until finish() or close()
    again = PartialRun(tmp_path, manifest)
    assert again.done() == set() and again.folder.name == f"{cache_key(manifest)}.partial"
