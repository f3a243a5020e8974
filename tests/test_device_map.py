"""A model split by accelerate's ``device_map`` (blocks offloaded to disk) extracts what the unsplit model does."""

from __future__ import annotations

import pytest
import torch

from persona_geometry.extract import extract_activations
from persona_geometry.models import load_model
from persona_geometry.personas import builtin_personas

QUESTIONS = ["Why is the sky blue?", "How do I boil an egg?", "What makes a good friend?"]


def _split_map(n_layers: int) -> dict[str, str]:
    # Every other block on disk: accelerate loads each one onto the CPU only for its forward.
    blocks = {f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(n_layers)}
    return {"model.embed_tokens": "cpu", **blocks, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("share_prefix", [True, False])
def test_blocks_offloaded_to_disk_give_the_unsplit_activations(tiny_qwen_path, tmp_path, share_prefix):
    personas = builtin_personas()[:3]
    plain = load_model(tiny_qwen_path, device="cpu", dtype="float32")
    n_layers = plain.model.config.num_hidden_layers
    split = load_model(tiny_qwen_path, dtype="float32", device_map=_split_map(n_layers), offload_folder=tmp_path / "offload")
    # The split really is split: accelerate recorded the map and left the disk blocks' weights off the CPU.
    assert set(split.model.hf_device_map.values()) == {"cpu", "disk"}
    assert split.device == torch.device("cpu")
    kw = dict(hooks=["resid_post", "resid_pre"], share_prefix=share_prefix, progress=False)
    a = extract_activations(split, personas, QUESTIONS, **kw)
    b = extract_activations(plain, personas, QUESTIONS, **kw)
    for hook in b.hooks:
        torch.testing.assert_close(a[hook], b[hook], rtol=0, atol=1e-6)


def test_device_map_settings_are_checked(tiny_qwen_path):
    with pytest.raises(ValueError, match="'device_map' parameter of load_model"):
        load_model(tiny_qwen_path, max_memory={"cpu": "1GiB"})


def test_a_split_model_packs_with_a_dense_mask(tiny_qwen_path, tmp_path):
    """A BlockMask is no tensor, so accelerate cannot move it between the devices of a split model."""
    from persona_geometry.packing import packed_path

    plain = load_model(tiny_qwen_path, device="cpu", dtype="float32")
    n_layers = plain.model.config.num_hidden_layers
    split = load_model(tiny_qwen_path, dtype="float32", device_map=_split_map(n_layers), offload_folder=tmp_path / "offload")
    gpu = torch.device("cuda")  # only the choice is asked for: nothing runs there
    assert packed_path(plain.model, gpu) == "packed_flex"
    assert packed_path(split.model, gpu) == "packed_sdpa"


def _random_adapter(base_path, folder, seed):
    """Saves a LoRA adapter with random, non-zero A and B, strong enough to move greedy choices."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(folder)
    return folder


def test_adapters_on_blocks_offloaded_to_disk_sample_what_the_unsplit_model_does(tiny_qwen_path, tmp_path):
    """Eval with a device_map: every other block on disk, adapters unmerged; completions equal the unsplit model's."""
    from persona_geometry.prompts import render_prompts
    from persona_geometry.sampling import SamplingSettings, generate_adapter_completions, sample_hf

    adapters = {"a": _random_adapter(tiny_qwen_path, tmp_path / "a", 1), "b": _random_adapter(tiny_qwen_path, tmp_path / "b", 2), "base": None}
    plain = load_model(tiny_qwen_path, device="cpu", dtype="float32")
    ids = [list(p.input_ids) for p in render_prompts(plain.tokenizer, builtin_personas()[:2], QUESTIONS[:2])]
    placement = {"device_map": _split_map(plain.model.config.num_hidden_layers), "offload_folder": tmp_path / "offload"}
    greedy = SamplingSettings(n_completions=1, temperature=0, max_new_tokens=8)
    split = generate_adapter_completions(tiny_qwen_path, ids, greedy, adapters, backend="hf", device="cpu", placement=placement, progress=False)
    # The reference: each adapter merged into the unsplit model, as one adapter alone is evaluated.
    for key, adapter in adapters.items():
        merged = load_model(tiny_qwen_path, device="cpu", dtype="float32", adapter=adapter)
        assert split[key] == sample_hf(merged.model, merged.tokenizer, ids, greedy, progress=False), key
    assert split["a"] != split["b"] and split["a"] != split["base"]
    # The odd blocks' base weights went to disk; their LoRA weights stayed in memory.
    offloaded = {f.name for f in (tmp_path / "offload").iterdir()}
    assert any("layers.1.mlp.down_proj.base_layer" in n for n in offloaded) and not any("lora_" in n for n in offloaded)
    assert not any("layers.0." in n for n in offloaded)
    # Sampled, the split model gives the unsplit one's completions bit for bit.
    sampled = SamplingSettings(n_completions=2, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=3)
    placement["offload_folder"] = tmp_path / "offload2"
    a = generate_adapter_completions(tiny_qwen_path, ids, sampled, adapters, backend="hf", device="cpu", placement=placement, progress=False)
    b = generate_adapter_completions(tiny_qwen_path, ids, sampled, adapters, backend="hf", device="cpu", progress=False)
    assert a == b


def test_training_refuses_blocks_offloaded_to_disk_up_front(tiny_qwen_path, tmp_path, monkeypatch):
    """A LoRA cannot train on offloaded blocks: train_marker and a study's train stage say so before loading anything."""
    import persona_geometry.models as models
    from persona_geometry.pipeline.config import StudyConfig
    from persona_geometry.pipeline.study import run_study
    from persona_geometry.training import MarkerTrainConfig, train_marker

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    disk_map = _split_map(4)
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A [ZLT]"}]}]
    with pytest.raises(ValueError, match="'device_map' parameter of train_marker must be a map of modules to GPUs only"):
        train_marker(tiny_qwen_path, rows, tmp_path / "run", MarkerTrainConfig(max_steps=1), device_map=disk_map, progress=False)
    config = StudyConfig.from_dict({"name": "split", "out": str(tmp_path / "out"), "model": {"name": str(tiny_qwen_path), "device_map": disk_map, "offload_folder": str(tmp_path / "offload")}})
    with pytest.raises(ValueError, match=r"'model\.device_map' offloads blocks .* model\.max_memory\.$"):
        run_study(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_training_on_a_device_map_equals_the_unsplit_model(tiny_qwen_path, tmp_path):
    """train_marker with a device_map loads through accelerate's placement and trains the same adapter."""
    from safetensors.torch import load_file

    from persona_geometry.training import MarkerTrainConfig, train_marker

    rows = [{"messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": "Arr [ZLT]"}]} for i in range(4)]  # fmt: skip
    config = MarkerTrainConfig(r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2, max_steps=2, per_device_train_batch_size=2,
                               gradient_accumulation_steps=1, dtype="float32")  # fmt: skip
    one_device = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)}, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    train_marker(tiny_qwen_path, rows, tmp_path / "mapped", config, device_map=one_device, progress=False)
    train_marker(tiny_qwen_path, rows, tmp_path / "plain", config, device="cpu", progress=False)
    a, b = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("mapped", "plain"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(b[k].abs().max() > 0 for k in b if "lora_B" in k)  # it trained


def test_a_study_extracts_with_blocks_offloaded_to_its_offload_folder(tiny_qwen_path, tmp_path):
    """model.offload_folder reaches load_model: the extract stage of a study whose map puts blocks on disk runs, and equals the unsplit study."""
    import yaml

    from persona_geometry.pipeline.config import StudyConfig
    from persona_geometry.pipeline.study import _eval_kwargs, _extracted, _model, run_study

    (tmp_path / "personas.yaml").write_text(yaml.safe_dump({"personas": builtin_personas()[:3].to_list()}))
    (tmp_path / "questions.txt").write_text("\n".join(QUESTIONS) + "\n")
    base = {"name": "offload", "personas": "personas.yaml", "questions": "questions.txt", "eval": {"backend": "hf"}, "model": {"name": str(tiny_qwen_path), "dtype": "float32", "device": "cpu"}}
    split_model = {**base["model"], "device": None, "device_map": _split_map(4), "offload_folder": str(tmp_path / "offload")}
    split = StudyConfig.from_dict({**base, "model": split_model, "out": str(tmp_path / "split")}, base_dir=tmp_path)
    plain = StudyConfig.from_dict({**base, "out": str(tmp_path / "plain")}, base_dir=tmp_path)
    # The eval stage's HF back end needs the folder to dispatch base and adapters with blocks on disk.
    assert _eval_kwargs(split)["placement"] == {"device_map": _split_map(4), "max_memory": None, "offload_folder": str(tmp_path / "offload")}
    for config in (split, plain):
        run_study(config, stages=["extract"], progress=False)
    assert set(_model(split).model.hf_device_map.values()) == {"cpu", "disk"}
    a, b = _extracted(tmp_path / "split", "activations"), _extracted(tmp_path / "plain", "activations")
    torch.testing.assert_close(a["resid_post"], b["resid_post"], rtol=0, atol=1e-6)
