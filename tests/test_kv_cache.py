"""The decode cache and grouped attention against transformers' own sdpa path and DynamicCache."""

from __future__ import annotations

from contextlib import nullcontext

import pytest


def test_grouped_decode_attention_equals_sdpa_with_repeated_heads():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from persona_geometry.kv_cache import grouped_decode_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, kv, dim = 3, 8, 2, 11, 32
    query = torch.randn(batch, heads, 1, dim, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, kv, dim, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, kv, dim, dtype=torch.float64)
    mask = torch.ones(batch, 1, 1, kv, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of different lengths
    mask[2, ..., :1] = False
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
    assert got.shape == want.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # An additive mask (−inf where masked) gives the same.
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    got, _ = grouped_decode_attention(module, query, key, value, additive, scaling=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_grouped_decode_attention_hands_prefill_to_sdpa():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from persona_geometry.kv_cache import grouped_decode_attention

    torch.manual_seed(1)
    query, key, value = torch.randn(2, 4, 5, 32), torch.randn(2, 2, 5, 32), torch.randn(2, 2, 5, 32)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    want, _ = sdpa_attention_forward(module, query, key, value, None)
    got, _ = grouped_decode_attention(module, query, key, value, None)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("select", [False, True])
def test_growing_cache_decode_equals_dynamic_cache(tiny_qwen_path, select):
    """Prefill, a row dropped (batch_select_indices), decode steps: logits equal DynamicCache's."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from persona_geometry.kv_cache import GrowingCache, decode_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path, dtype=torch.float32).eval()
    torch.manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding

    def run(cache, grouped: bool):
        steps = []
        m = mask.clone()
        with torch.inference_mode(), decode_attention(model) if grouped else nullcontext() as took:
            if grouped:
                assert took is True
            out = model(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0),
                        past_key_values=cache, use_cache=True)  # fmt: skip
            token = out.logits[:, -1].argmax(-1)
            positions = m.sum(-1)
            if select:
                keep = torch.tensor([0, 2])
                cache.batch_select_indices(keep)
                m, token, positions = m[keep], token[keep], positions[keep]
            for _ in range(4):
                m = torch.cat([m, torch.ones_like(m[:, :1])], dim=-1)
                out = model(input_ids=token[:, None], attention_mask=m, position_ids=positions[:, None],
                            past_key_values=cache, use_cache=True)  # fmt: skip
                steps.append(out.logits[:, -1])
                token, positions = out.logits[:, -1].argmax(-1), positions + 1
        return torch.stack(steps)

    want = run(DynamicCache(), grouped=False)
    got = run(GrowingCache(model, capacity=7 + 4), grouped=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after the block


def test_growing_cache_refuses_to_overflow(tiny_qwen_path):
    import torch
    from transformers import AutoModelForCausalLM

    from persona_geometry.kv_cache import GrowingCache

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path, dtype=torch.float32).eval()
    cache = GrowingCache(model, capacity=4)
    with torch.inference_mode(), pytest.raises(ValueError, match="capacity 4"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long), past_key_values=cache, use_cache=True)
