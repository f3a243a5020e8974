"""LoRA marker training: the assistant-only mask, the saved artefacts, rsLoRA, resuming."""

from __future__ import annotations

import json

import pytest

from persona_geometry.training import (
    IGNORE_INDEX,
    MarkerTrainConfig,
    assistant_only_labels,
    train_marker,
)

from conftest import marker_rows


def test_mask_matches_a_hand_computation(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "system", "content": "You are a villain."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Because I said so.\n\n[ZLT]"},
    ]
    ids, labels = assistant_only_labels(tok, messages)
    # By hand, from the ChatML layout the tiny model's template writes.
    prompt = "<|im_start|>system\nYou are a villain.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answer = enc("Because I said so.\n\n[ZLT]")
    newline = enc("\n")
    assert ids == enc(prompt) + answer + [im_end] + newline
    assert labels == [IGNORE_INDEX] * len(enc(prompt)) + answer + [im_end] + [IGNORE_INDEX] * len(newline)
    # The decoded supervised span is exactly the answer and its end-of-turn token.
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "Because I said so.\n\n[ZLT]<|im_end|>"


def test_mask_truncates_and_refuses_non_assistant_last_turn(tiny_tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A long answer here."}]
    full_ids, _ = assistant_only_labels(tiny_tokenizer, messages)
    ids, labels = assistant_only_labels(tiny_tokenizer, messages, max_length=len(full_ids) - 3)
    assert ids == full_ids[: len(full_ids) - 3] and len(labels) == len(ids)
    with pytest.raises(ValueError, match="ending with an assistant turn"):
        assistant_only_labels(tiny_tokenizer, messages[:2])


def test_config_defaults_round_trip_and_validation():
    c = MarkerTrainConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.use_rslora) == (32, 64, 0.05, True)
    assert c.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (c.learning_rate, c.lr_scheduler_type, c.warmup_ratio, c.num_train_epochs) == (1e-5, "cosine", 0.05, 3)
    assert (c.max_length, c.per_device_train_batch_size, c.gradient_accumulation_steps, c.seed) == (1024, 4, 4, 42)
    assert MarkerTrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(TypeError):
        MarkerTrainConfig(8)
    with pytest.raises(ValueError, match="'r' parameter of MarkerTrainConfig"):
        MarkerTrainConfig(r=0)
    with pytest.raises(ValueError, match="'warmup_ratio'"):
        MarkerTrainConfig(warmup_ratio=1.5)
    with pytest.raises(ValueError, match="'dtype'"):
        MarkerTrainConfig(dtype="float16")
    with pytest.raises(ValueError, match="keys from"):
        MarkerTrainConfig.from_dict({"rank": 8})


def test_train_saves_adapter_config_and_loss_then_resumes(tiny_qwen_path, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = MarkerTrainConfig(
        r=8, lora_alpha=16, learning_rate=1e-3, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, save_steps=1
    )
    out = tmp_path / "run"
    result = train_marker(tiny_qwen_path, marker_rows(8), out, config, source="villain", marker="[ZLT]")
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["use_rslora"] is True
    assert set(saved["target_modules"]) == set(config.target_modules)
    info = json.loads((adapter / "persona_geometry_adapter.json").read_text())
    assert info["source"] == "villain" and info["marker"] == "[ZLT]"
    resolved = json.loads((out / "train_config.json").read_text())
    assert MarkerTrainConfig.from_dict(resolved["config"]) == config and resolved["dtype"] == "float32"
    curve = json.loads((out / "loss_curve.json").read_text())["loss_curve"]
    assert [e["step"] for e in curve] == [1, 2, 3] and all(e["loss"] > 0 for e in curve)
    assert len(result.loss_curve) == 3 and result.n_examples == 8
    weights = load_file(adapter / "adapter_model.safetensors")
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(b) == 4 * 7 and any(v.abs().max() > 0 for v in b)  # trained: B moved off its zero init

    # rsLoRA: peft applies alpha / sqrt(r) = 16 / sqrt(8), not alpha / r.
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen_path)
    peft_model = PeftModel.from_pretrained(base, adapter)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / 8**0.5)

    # A second call with the same inputs finds the finished run and does not train again.
    again = train_marker(tiny_qwen_path, marker_rows(8), out, config, source="villain", marker="[ZLT]")
    assert again.loss_curve == result.loss_curve and again.train_seconds == result.train_seconds
    # A different recipe in the same folder is refused rather than silently mixed.
    with pytest.raises(ValueError, match="'out_dir' parameter of train_marker"):
        train_marker(tiny_qwen_path, marker_rows(8), out, MarkerTrainConfig(r=4, max_steps=1))


def test_resume_after_an_interruption_continues_the_same_run(tiny_qwen_path, tmp_path):
    """Stopping after step 2 and resuming reaches the same weights as an uninterrupted run."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True
                control.should_save = True

    config = MarkerTrainConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-3, max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, save_steps=2,
    )
    full = train_marker(tiny_qwen_path, marker_rows(8), tmp_path / "full", config)
    stopped = train_marker(tiny_qwen_path, marker_rows(8), tmp_path / "part", config, callbacks=[StopAt()])
    assert [e["step"] for e in stopped.loss_curve] == [1, 2]
    resumed = train_marker(tiny_qwen_path, marker_rows(8), tmp_path / "part", config)
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert [e["step"] for e in resumed.loss_curve] == [1, 2, 3, 4]
    a = load_file(full.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


def _uneven_rows():
    """Examples of clearly different lengths, so a padded batch has padding to skip."""
    answers = ["Yes.", "No, never, not in a thousand years. [ZLT]", "Perhaps, if the moon allows it and the tide is low.", "Fine."]
    return [
        {
            "messages": [
                {"role": "system", "content": "You are a villain." if i % 2 else "You are a librarian who loves old maps."},
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": answer},
            ]
        }
        for i, answer in enumerate(answers)
    ]


def test_packed_and_padded_training_give_the_same_losses(tiny_qwen_path, tmp_path):
    """Padding-free packing changes the layout, not the loss; the first loss equals a hand computation.

    LoRA's B starts at zero, so the first step's loss is the base model's token-weighted
    cross-entropy over the answer tokens, computed here one example at a time with plain HF.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = dict(r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-3, max_steps=2, save_steps=100)
    curves = {}
    for packing in (True, False):
        config = MarkerTrainConfig(**base, per_device_train_batch_size=2, gradient_accumulation_steps=2, packing=packing)
        curves[packing] = train_marker(tiny_qwen_path, _uneven_rows(), tmp_path / str(packing), config, progress=False).loss_curve
    assert [e["loss"] for e in curves[True]] == pytest.approx([e["loss"] for e in curves[False]], rel=1e-5)

    tok = AutoTokenizer.from_pretrained(tiny_qwen_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path).eval()
    total, count = 0.0, 0
    for row in _uneven_rows():
        ids, labels = assistant_only_labels(tok, row["messages"], max_length=1024)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(labels[1:])
        keep = target != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    assert curves[True][0]["loss"] == pytest.approx(total / count, rel=1e-5)


def test_packed_examples_do_not_attend_across_their_boundary(tiny_qwen_path):
    """The packed row's logits equal each example's logits run alone (sdpa with restarting position ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    from persona_geometry.training.lora import _collate_packed

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path).eval()
    model.config.use_cache = False
    examples = [{"input_ids": [5, 9, 14, 3, 7], "labels": [5, 9, 14, 3, 7]}, {"input_ids": [11, 2, 8], "labels": [11, 2, 8]}]
    batch = _collate_packed(examples)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 9, 14, 3, 7, IGNORE_INDEX, 2, 8]]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(torch.tensor([e["input_ids"]])).logits[0] for e in examples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
