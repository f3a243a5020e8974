"""The HF sampling loop: per-completion seeds, one base model for many unmerged adapters."""

from __future__ import annotations

import pytest

from persona_geometry.personas import builtin_personas
from persona_geometry.sampling import (
    SamplingSettings,
    generate_adapter_completions,
    generate_completions,
)

from conftest import count_model_loads

QUESTIONS = ["Why is the sky blue?", "How do I boil an egg?"]


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    from persona_geometry.prompts import render_prompts

    prompts = render_prompts(tiny_tokenizer, builtin_personas()[:3], QUESTIONS)
    ids = [list(p.input_ids) for p in prompts]
    assert len({len(i) for i in ids}) > 1  # batches need padding
    return ids


def _random_adapter(base_path, folder, seed):
    """Saves a LoRA adapter with random (non-zero) A and B, so it changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)  # strong enough to move greedy choices on a tiny model
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two_adapters(tiny_qwen_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": _random_adapter(tiny_qwen_path, root / "a", 1), "b": _random_adapter(tiny_qwen_path, root / "b", 2)}


def test_sampled_completions_do_not_depend_on_batch_size(tiny_qwen_path, prompt_ids):
    s = SamplingSettings(n_completions=3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=5)
    by_size = {b: generate_completions(tiny_qwen_path, prompt_ids, s, backend="hf", batch_size=b, progress=False) for b in (1, 64)}
    assert by_size[1] == by_size[64]
    flat = [t for per_prompt in by_size[1] for t in per_prompt]
    assert len(set(flat)) > len(flat) // 2  # really sampled: completions of one prompt differ


def test_greedy_per_adapter_equals_the_merged_adapter_one_prompt_at_a_time(tiny_qwen_path, prompt_ids, two_adapters):
    """Mixed batches of unmerged adapters give what each merged adapter gives with plain HF generate."""
    import torch

    from persona_geometry.models import load_model

    greedy = SamplingSettings(n_completions=1, temperature=0, max_new_tokens=8)
    mixed = generate_adapter_completions(
        tiny_qwen_path, prompt_ids, greedy, {**two_adapters, "base": None}, backend="hf", batch_size=5, progress=False
    )
    assert set(mixed) == {"a", "b", "base"}
    for key, adapter in [*two_adapters.items(), ("base", None)]:
        handle = load_model(tiny_qwen_path, device="cpu", dtype="float32", adapter=adapter)
        tok = handle.tokenizer
        for ids, got in zip(prompt_ids, mixed[key], strict=True):
            with torch.no_grad():
                out = handle.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[0, len(ids) :].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            assert got == [tok.decode(new, skip_special_tokens=True)], key
    assert mixed["a"] != mixed["b"] and mixed["a"] != mixed["base"]  # the adapters matter


def test_an_adapter_sampled_alone_or_with_others_gives_the_same_completions(tiny_qwen_path, prompt_ids, two_adapters):
    s = SamplingSettings(n_completions=2, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=3)
    alone = generate_completions(tiny_qwen_path, prompt_ids, s, adapter=two_adapters["b"], backend="hf", batch_size=3, progress=False)
    mixed = generate_adapter_completions(tiny_qwen_path, prompt_ids, s, two_adapters, backend="hf", batch_size=7, progress=False)
    assert mixed["b"] == alone


def test_the_base_model_is_loaded_once_for_all_adapters(tiny_qwen_path, prompt_ids, two_adapters, monkeypatch):
    calls = count_model_loads(monkeypatch)
    s = SamplingSettings(n_completions=1, temperature=0, max_new_tokens=2)
    generate_adapter_completions(tiny_qwen_path, prompt_ids[:2], s, two_adapters, backend="hf", progress=False)
    assert calls == [tiny_qwen_path]


def test_nucleus_sampling_matches_the_distribution_by_hand():
    """The inverse-CDF choice over the nucleus, against a hand computation on 4 tokens."""
    import torch

    from persona_geometry.hf_decode import next_tokens

    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    logits = probs.log().repeat(6, 1)
    # top_p 0.8 keeps tokens 1 (0.5), 3 (0.25), and 2 (0.15): mass before 2 is 0.75 < 0.8.
    # Renormalised over 0.9 in id order: token 1 covers [0, 0.5/0.9), 2 up to 0.65/0.9, 3 up to 1.
    u = torch.tensor([0.0, 0.55, 0.56, 0.70, 0.73, 0.999], dtype=torch.float64)
    got = next_tokens(logits, u, temperature=1.0, top_p=0.8).tolist()
    assert got == [1, 1, 2, 2, 3, 3]
    assert next_tokens(logits, None, temperature=0.0, top_p=1.0).tolist() == [1] * 6
    assert next_tokens(logits[:1], torch.tensor([0.05], dtype=torch.float64), temperature=1.0, top_p=1.0).tolist() == [0]


def test_generate_adapter_completions_rejects_no_adapters(tiny_qwen_path):
    with pytest.raises(ValueError, match="'adapters' parameter of generate_adapter_completions"):
        generate_adapter_completions(tiny_qwen_path, [[1, 2]], SamplingSettings(), {}, backend="hf")


def test_row_cumsum_by_one_scan_matches_the_plain_cumsum():
    """The CUDA path (rows scanned as one sequence, offsets removed) equals torch's row-wise cumsum."""
    import torch

    from persona_geometry import hf_decode

    probs = torch.softmax(torch.randn(7, 5003, generator=torch.Generator().manual_seed(0)), dim=-1)
    expected = probs.double().cumsum(dim=-1)
    torch.testing.assert_close(hf_decode._cumsum_by_one_scan(probs.double()), expected, atol=1e-13, rtol=0)
    torch.testing.assert_close(hf_decode.row_cumsum(probs), expected, atol=0, rtol=0)
