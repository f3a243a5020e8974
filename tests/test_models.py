"""load_model: local folders, the offline HF cache, dtypes, and peft adapters checked against a hand merge."""

from __future__ import annotations

import shutil

import pytest
import torch

from persona_geometry import (
    ModelHandle,
    builtin_personas,
    builtin_questions,
    extract_activations,
    load_model,
)
from persona_geometry.models import weights_fingerprint

PERSONAS = builtin_personas().select(["helpful_assistant", "villain"])
QUESTIONS = builtin_questions()[:3]


@pytest.fixture(scope="module")
def lora_adapter(tiny_qwen_path, tmp_path_factory):
    """A rank-4 LoRA adapter on q/v/down projections of the tiny Qwen2, with non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, config)
    folder = tmp_path_factory.mktemp("adapters") / "lora"
    peft_model.save_pretrained(folder)
    return folder


def test_local_folder_handle_and_fingerprint(tiny_qwen_path, tmp_path):
    handle = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    assert isinstance(handle, ModelHandle)
    assert handle.dtype == torch.float32 and handle.device == torch.device("cpu")
    assert handle.revision is None and handle.adapter is None and handle.path == tiny_qwen_path
    assert handle.weights_id == f"sha:{weights_fingerprint(tiny_qwen_path)}"
    assert not handle.model.training
    with pytest.raises(AttributeError):
        handle.dtype = torch.bfloat16  # frozen
    # A copy with other weights gets another identity; the same bytes re-saved too (mtime).
    other = tmp_path / "copy"
    shutil.copytree(tiny_qwen_path, other)
    assert weights_fingerprint(other, include_mtime=False) == weights_fingerprint(tiny_qwen_path, include_mtime=False)
    with (other / "model.safetensors").open("r+b") as f:
        f.seek(-2048, 2)
        f.write(b"\x01" * 16)
    assert weights_fingerprint(other, include_mtime=False) != weights_fingerprint(tiny_qwen_path, include_mtime=False)


def test_dtypes(tiny_llama_path):
    assert load_model(tiny_llama_path, dtype="bfloat16", device="cpu").dtype == torch.bfloat16
    assert load_model(tiny_llama_path, dtype=torch.float16, device="cpu").dtype == torch.float16
    assert load_model(tiny_llama_path, dtype="auto", device="cpu").dtype == torch.float32  # the checkpoint's own
    assert load_model(tiny_llama_path, device="cpu").dtype == torch.float32  # default on CPU
    with pytest.raises(ValueError, match="'dtype' parameter of load_model"):
        load_model(tiny_llama_path, dtype="float8")
    with pytest.raises(ValueError, match="'device' parameter of load_model"):
        load_model(tiny_llama_path, device="gpu:zero")


def test_hub_id_resolves_from_the_offline_cache_only(tiny_qwen_path, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'acme/tiny-chat'.*not cached"):
        load_model("acme/tiny-chat", device="cpu")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-chat"
    shutil.copytree(tiny_qwen_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    handle = load_model("acme/tiny-chat", device="cpu", dtype="float32")
    assert handle.model_id == "acme/tiny-chat" and handle.revision == commit
    assert handle.weights_id == f"acme/tiny-chat@{commit}"
    with pytest.raises(FileNotFoundError, match="'acme/tiny-chat' at revision 'v2'"):
        load_model("acme/tiny-chat", revision="v2", device="cpu")
    with pytest.raises(FileNotFoundError, match="'name_or_path' parameter of load_model"):
        load_model(tmp_path / "no" / "such" / "folder")


def test_adapter_changes_activations_and_matches_a_hand_merged_model(tiny_qwen_path, lora_adapter):
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    tuned = load_model(tiny_qwen_path, dtype="float32", device="cpu", adapter=lora_adapter)
    assert tuned.adapter == str(lora_adapter) and "+adapter:" in tuned.weights_id
    assert tuned.weights_id != base.weights_id
    assert type(tuned.model).__name__ == "Qwen2ForCausalLM"  # merged, not a PeftModel

    # Merge by hand: W += (alpha / r) * B @ A for every adapted linear layer.
    cfg = json.loads((lora_adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(str(lora_adapter / "adapter_model.safetensors"))
    manual = AutoModelForCausalLM.from_pretrained(tiny_qwen_path, dtype=torch.float32).eval()
    merged = 0
    with torch.no_grad():
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            module = manual.get_submodule(key.removeprefix("base_model.model.").split(".lora_A.")[0])
            module.weight += scale * b @ a
            merged += 1
    assert merged == 3 * 4  # three projections in each of four blocks
    manual_handle = ModelHandle(
        model=manual, tokenizer=base.tokenizer, model_id="manual", revision=None,
        dtype=torch.float32, device=torch.device("cpu"), weights_id="manual",
    )
    got = extract_activations(tuned, PERSONAS, QUESTIONS, progress=False)["resid_post"]
    want = extract_activations(manual_handle, PERSONAS, QUESTIONS, progress=False)["resid_post"]
    plain = extract_activations(base, PERSONAS, QUESTIONS, progress=False)["resid_post"]
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-2


def test_adapter_for_another_model_is_refused(tiny_llama_path, lora_adapter, tmp_path):
    with pytest.raises(ValueError, match="'adapter' parameter of load_model"):
        load_model(tiny_llama_path, device="cpu", adapter=lora_adapter)
    with pytest.raises(FileNotFoundError, match="'adapter' parameter of load_model"):
        load_model(tiny_llama_path, device="cpu", adapter=tmp_path)
