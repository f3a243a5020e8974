"""`persona-geometry extract`: parses, calls extract_activations, saves; bad input exits with status 2."""

from __future__ import annotations

import torch

from persona_geometry import ActivationSet, builtin_personas, extract_activations, load_model
from persona_geometry.pipeline.cli import main


def test_extract_command_writes_what_the_library_returns(tiny_qwen_path, tmp_path, capsys):
    personas = builtin_personas().select(["helpful_assistant", "medical_doctor"])
    personas.save(tmp_path / "personas.yaml")
    (tmp_path / "questions.txt").write_text("What is rain?\nHow do magnets work, and why?\n")
    status = main([
        "extract", "--model", str(tiny_qwen_path), "--personas", str(tmp_path / "personas.yaml"),
        "--questions", str(tmp_path / "questions.txt"), "--layers", "1,-1", "--hooks", "resid_post,resid_pre",
        "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "acts"),
    ])
    assert status == 0
    acts = ActivationSet.load(tmp_path / "acts")
    assert acts.layers == (1, 3) and acts.hooks == ["resid_post", "resid_pre"]
    assert acts.personas.names == ["helpful_assistant", "medical_doctor"]
    want = extract_activations(
        load_model(tiny_qwen_path, dtype="float32", device="cpu"), personas, ["What is rain?", "How do magnets work, and why?"],
        layers=[1, 3], progress=False,
    )
    assert torch.equal(acts["resid_post"], want["resid_post"])


def test_extract_command_reports_bad_input_in_one_line(tiny_qwen_path, tmp_path, capsys):
    status = main(["extract", "--model", str(tiny_qwen_path), "--layers", "9", "--device", "cpu", "--out", str(tmp_path / "x")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Checked against config.json before the weights load: one line, no loading bar.
    assert err == ["persona-geometry extract: error: The '--layers' parameter of extract must be ints in [-4, 3]. Got 9 instead."]
    assert not (tmp_path / "x").exists()


def test_extract_command_turns_block_compilation_on_and_off(tiny_qwen_path, tmp_path, monkeypatch):
    """--compile-blocks / --no-compile-blocks reach extract_activations (compiled with the eager
    backend here, to skip code generation); without either, the CPU runs uncompiled."""
    import functools

    from persona_geometry import packing

    monkeypatch.setattr(packing, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    personas = builtin_personas().select(["helpful_assistant"])
    personas.save(tmp_path / "personas.yaml")
    (tmp_path / "questions.txt").write_text("What is rain?\n")
    common = ["extract", "--model", str(tiny_qwen_path), "--personas", str(tmp_path / "personas.yaml"),
              "--questions", str(tmp_path / "questions.txt"), "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    for flag, want in (("--compile-blocks", True), ("--no-compile-blocks", False), (None, False)):
        out = tmp_path / f"acts_{flag}"
        assert main([*common, *([flag] if flag else []), "--out", str(out)]) == 0
        assert ActivationSet.load(out).manifest["compile_blocks"] is want
    assert list(packing._COMPILED)  # the compiled run compiled
