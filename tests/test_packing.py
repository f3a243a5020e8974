"""Packed extraction: the layout, the masks, and the activations against one-prompt-at-a-time HF forwards."""

from __future__ import annotations

import pytest
import torch

from persona_geometry import ModelHandle, Persona, extract_activations, load_model, render_prompts
from persona_geometry.hooks import find_layers
from persona_geometry.packing import (
    BLOCK,
    block_counts,
    block_mask,
    build_pack,
    dense_mask,
    group_prefix_lengths,
    pack_budget,
    packed_path,
    plan_packs,
)

# A question the template renders as nothing, so its prompt is the shortest of its persona.
EMPTY = "(nothing)"
TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | replace('(nothing)', '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# System prompts that are prefixes of each other, and one of a very different length.
PERSONAS = [
    Persona(name="short", system_prompt="You are a pirate."),
    Persona(name="longer", system_prompt="You are a pirate. You sail the seas and speak in rhymes."),
    Persona(name="longest", system_prompt="You are a pirate. You sail the seas and speak in rhymes. " * 6),
]
QUESTIONS = [
    "Hi?",
    EMPTY,
    "Describe, step by step and in great detail, how a ship is built, rigged, launched and sailed across an ocean. " * 3,
    "What is two plus two?",
]


def reference(model, ids: list[tuple[int, ...]], n_layers: int) -> torch.Tensor:
    """Returns ``[prompt, layer, d_model]``: block outputs at the last token, one unpadded prompt at a time.

    Layer l < L-1 is ``hidden_states[l + 1]``; the last block's output comes from a hook on that
    block (HF's last hidden state has the final norm applied).
    """
    _, blocks = find_layers(model)
    captured = {}
    handle = blocks[-1].register_forward_hook(lambda m, a, o: captured.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    rows = []
    try:
        with torch.no_grad():
            for x in ids:
                hs = model(torch.tensor([x]), output_hidden_states=True).hidden_states
                rows.append(torch.stack([hs[layer + 1][0, -1] for layer in range(n_layers - 1)] + [captured["out"][0, -1]]))
    finally:
        handle.remove()
    return torch.stack(rows).float()


def _gpt2_handle(tokenizer) -> ModelHandle:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=3, n_head=2, n_positions=512)
    model = GPT2LMHeadModel(config).eval()
    return ModelHandle(
        model=model, tokenizer=tokenizer, model_id="tiny-gpt2", revision=None,
        dtype=torch.float32, device=torch.device("cpu"), weights_id="test-gpt2",
    )  # fmt: skip


@pytest.fixture(scope="module", params=["qwen", "llama", "gpt2"])
def handle(request):
    if request.param == "gpt2":
        return _gpt2_handle(request.getfixturevalue("tiny_tokenizer"))
    return load_model(request.getfixturevalue(f"tiny_{request.param}_path"), dtype="float32", device="cpu")


def _check_against_reference(handle, acts, personas, questions):
    prompts = render_prompts(handle.tokenizer, personas, questions, chat_template=TEMPLATE)
    n_layers = len(find_layers(handle.model)[1])
    ref = reference(handle.model, [p.input_ids for p in prompts], n_layers)
    got = acts["resid_post"].reshape(len(prompts), n_layers, -1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


def test_packed_engine_matches_one_prompt_at_a_time(handle):
    """Rotary (Qwen2, Llama) and learned positions (GPT-2); prefixes that are prefixes of each other."""
    acts = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, hooks=["resid_post", "resid_pre"], progress=False)
    assert acts.manifest["forward"] == "packed_sdpa" and acts.manifest["share_prefix"]
    lengths = acts.n_tokens.flatten().tolist()
    assert max(lengths) > 4 * min(lengths)  # very different lengths
    _check_against_reference(handle, acts, PERSONAS, QUESTIONS)
    # resid_pre of block l is the output of block l - 1.
    assert (acts["resid_pre"][:, :, 1:] - acts["resid_post"][:, :, :-1]).abs().max().item() <= 1e-5


def test_packed_engine_with_small_packs_split_groups_and_layer_subsets(handle):
    """A budget smaller than a persona splits its prompts over packs, each repeating the prefix."""
    prompts = render_prompts(handle.tokenizer, PERSONAS, QUESTIONS, chat_template=TEMPLATE)
    budget = max(p.n_tokens for p in prompts) + 1  # every prompt fits, no persona does
    acts = extract_activations(
        handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, batch_tokens=budget, layers=[0, -1], progress=False
    )
    assert acts.manifest["batch_tokens"] == -(-budget // BLOCK) * BLOCK
    full = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, pack=False, share_prefix=False, progress=False)
    assert full.manifest["forward"] == "padded"
    n_layers = full["resid_post"].shape[2]
    assert acts.layers == (0, n_layers - 1)
    assert (acts["resid_post"] - full["resid_post"][:, :, [0, n_layers - 1]]).abs().max().item() <= 1e-5


def test_one_question_per_persona_and_no_sharing(handle):
    one = extract_activations(handle, PERSONAS, QUESTIONS[2:3], chat_template=TEMPLATE, progress=False)
    assert one.manifest["forward"] == "packed_sdpa" and not one.manifest["share_prefix"]
    _check_against_reference(handle, one, PERSONAS, QUESTIONS[2:3])
    unshared = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, share_prefix=False, progress=False)
    assert not unshared.manifest["share_prefix"]
    _check_against_reference(handle, unshared, PERSONAS, QUESTIONS)


def test_the_last_block_read_runs_its_mlp_on_the_last_tokens_only(handle):
    """The last block whose output is read runs its MLP on one row per prompt, the blocks
    before it on every token; the activations still equal one prompt at a time, and the block
    gets its own MLP back."""
    blocks = find_layers(handle.model)[1]
    mlps = [b.mlp for b in blocks]
    rows: dict[int, int] = {}

    def count(i):
        return lambda module, args: rows.__setitem__(i, rows.get(i, 0) + args[0].shape[-2])

    hooks = [m.register_forward_pre_hook(count(i)) for i, m in enumerate(mlps)]
    try:
        acts = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, layers=[0, 1], progress=False)
    finally:
        for h in hooks:
            h.remove()
    prompts = render_prompts(handle.tokenizer, PERSONAS, QUESTIONS, chat_template=TEMPLATE)
    ids = [p.input_ids for p in prompts]
    groups = [list(range(k * len(QUESTIONS), (k + 1) * len(QUESTIONS))) for k in range(len(PERSONAS))]
    unique = sum(n + sum(len(ids[i]) - n for i in g) for g, n in zip(groups, group_prefix_lengths(ids, groups), strict=True))
    assert len(blocks) > 2 and 2 not in rows  # the forward stopped after block 1
    assert rows[1] == len(prompts) and rows[0] >= unique
    assert [b.mlp for b in blocks] == mlps
    ref = reference(handle.model, ids, len(blocks))[:, [0, 1]]
    assert (acts["resid_post"].reshape(ref.shape) - ref).abs().max().item() <= 1e-5


def test_peft_adapter_is_extracted_packed(tiny_qwen_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    torch.manual_seed(0)
    model = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)).eval()
    handle = ModelHandle(
        model=model, tokenizer=base.tokenizer, model_id="tiny-qwen+lora", revision=None,
        dtype=torch.float32, device=torch.device("cpu"), weights_id="test-lora",
    )  # fmt: skip
    acts = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, progress=False)
    assert acts.manifest["forward"] == "packed_sdpa"
    _check_against_reference(handle, acts, PERSONAS, QUESTIONS)
    # The adapter changes the activations: the base model alone (get_peft_model wrapped the
    # loaded one in place) gives others.
    plain = extract_activations(load_model(tiny_qwen_path, dtype="float32", device="cpu"), PERSONAS, QUESTIONS, chat_template=TEMPLATE, progress=False)
    assert (plain["resid_post"] - acts["resid_post"]).abs().max().item() > 1e-3


def test_eager_attention_takes_the_additive_mask(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    base = load_model(tiny_llama_path, dtype="float32", device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, attn_implementation="eager").eval()
    handle = ModelHandle(
        model=model, tokenizer=base.tokenizer, model_id="tiny-llama-eager", revision=None,
        dtype=torch.float32, device=torch.device("cpu"), weights_id="test-eager",
    )  # fmt: skip
    acts = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, progress=False)
    assert acts.manifest["forward"] == "packed_eager"
    _check_against_reference(handle, acts, PERSONAS, QUESTIONS)
    assert model.config._attn_implementation == "eager"  # switched back, if switched at all


def test_models_without_custom_masks_fall_back_and_pack_true_refuses(tiny_qwen_path, monkeypatch):
    base = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    # Attention without custom masks but able to switch: packed through sdpa, switched back after.
    base.model.config._attn_implementation_internal = "flash_attention_2"
    try:
        assert packed_path(base.model, base.device) == "packed_sdpa"
    finally:
        base.model.config._attn_implementation_internal = "sdpa"
    # A model that cannot switch its attention (not built on transformers' attention interface).
    monkeypatch.setattr(type(base.model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    assert packed_path(base.model, base.device) is None
    acts = extract_activations(base, PERSONAS[:2], QUESTIONS[:2], chat_template=TEMPLATE, progress=False)
    assert acts.manifest["forward"] == "prefix_cache"
    with pytest.raises(ValueError, match="'pack' parameter of extract_activations"):
        extract_activations(base, PERSONAS[:2], QUESTIONS[:2], chat_template=TEMPLATE, pack=True, progress=False)


def test_the_attention_switch_is_checked_once_then_set_on_the_one_config(tiny_qwen_path, monkeypatch):
    """A packed extraction switches the model's attention for its forward and back after: the
    first time through set_attn_implementation, later by setting the model's one config. A
    model whose parts hold configs of their own goes through set_attn_implementation every
    time, and every part is switched."""
    import copy

    from persona_geometry import extract as extract_module
    from persona_geometry.packing import use_attention

    handle = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    model = handle.model
    cls = type(model)
    calls = []
    original = cls.set_attn_implementation
    monkeypatch.setattr(cls, "set_attn_implementation", lambda self, impl, **kw: (calls.append(impl), original(self, impl, **kw))[1])
    seen = []
    # The eager path on a model loaded with sdpa: each extraction switches it, and back.
    monkeypatch.setattr(extract_module, "packed_path", lambda m, d: "packed_eager")
    monkeypatch.setattr(extract_module, "packed_engine", _recording(extract_module.packed_engine, model, seen))
    first = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, progress=False)
    assert calls == ["eager", "sdpa"]
    second = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, progress=False)
    assert calls == ["eager", "sdpa"]  # not called again
    # (The first extraction may run twice: this template fails the deferred render checks.)
    assert set(seen) == {"eager"} and model.config._attn_implementation == "sdpa"
    assert first.manifest["forward"] == second.manifest["forward"] == "packed_eager"
    assert torch.equal(first["resid_post"], second["resid_post"])
    _check_against_reference(handle, second, PERSONAS, QUESTIONS)

    # Parts with configs of their own: set_attn_implementation every time, every part switched.
    model = load_model(tiny_qwen_path, dtype="float32", device="cpu").model
    model.model.config = copy.deepcopy(model.config)
    calls.clear()
    for _ in range(2):
        with use_attention(model, "eager"):
            assert model.config._attn_implementation == model.model.config._attn_implementation == "eager"
        assert model.config._attn_implementation == model.model.config._attn_implementation == "sdpa"
    assert calls == ["eager", "sdpa", "eager", "sdpa"]


def test_packed_flex_attention_equals_transformers_flex_attention_without_copying_keys(monkeypatch):
    """The packed_flex path's attention: transformers' flex_attention to the bit, without its
    repeat_kv copy for a head count that is no power of two (6 query heads over 2 key/value
    heads); what the path never passes (a soft-cap here) goes to transformers' function."""
    import transformers.integrations.flex_attention as hf_flex
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from persona_geometry.packing import PACKED_FLEX_ATTENTION, packed_flex_attention

    assert packed_flex_attention() == PACKED_FLEX_ATTENTION
    attention = ALL_ATTENTION_FUNCTIONS[PACKED_FLEX_ATTENTION]
    copies = []
    repeat_kv = hf_flex.repeat_kv
    monkeypatch.setattr(hf_flex, "repeat_kv", lambda x, n: (copies.append(n), repeat_kv(x, n))[1])
    pack = build_pack(IDS, plan_packs(IDS, GROUPS, group_prefix_lengths(IDS, GROUPS), 1000)[0], pad_id=0)
    mask = block_mask(pack)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, pack.length, 32) for heads in (6, 2, 2))
    module = torch.nn.Module().eval()
    ours = attention(module, q, k, v, mask, scaling=0.2)[0]
    assert copies == []
    theirs = hf_flex.flex_attention_forward(module, q, k, v, mask, scaling=0.2)[0]
    assert copies == [3, 3]  # transformers copies keys and values three times over
    assert ours.shape == (1, pack.length, 6, 32) and torch.equal(ours, theirs)
    capped = attention(module, q, k, v, mask, scaling=0.2, softcap=2.0)[0]
    assert torch.equal(capped, hf_flex.flex_attention_forward(module, q, k, v, mask, scaling=0.2, softcap=2.0)[0])
    assert not torch.equal(capped, ours)


def test_the_packed_flex_path_matches_one_prompt_at_a_time(tmp_path, monkeypatch):
    """The packed_flex path end to end on the CPU (its GPU default), on a model of 6 query heads
    over 2 key/value heads: FlexAttention under the block mask, with the package's attention."""
    from persona_geometry import extract as extract_module
    from persona_geometry.packing import PACKED_FLEX_ATTENTION
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    path = build_tiny_model(tmp_path / "q6", TinyModelSpec(hidden_size=192, num_attention_heads=6, num_key_value_heads=2))
    handle = load_model(path, dtype="float32", device="cpu")
    seen = []
    monkeypatch.setattr(extract_module, "packed_path", lambda m, d: "packed_flex")
    monkeypatch.setattr(extract_module, "packed_engine", _recording(extract_module.packed_engine, handle.model, seen))
    acts = extract_activations(
        handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, compile_blocks=False, progress=False
    )
    assert acts.manifest["forward"] == "packed_flex" and set(seen) == {PACKED_FLEX_ATTENTION}
    assert handle.model.config._attn_implementation == "sdpa"  # switched back
    _check_against_reference(handle, acts, PERSONAS, QUESTIONS)


def _recording(engine, model, seen):
    """``packed_engine`` that records the implementation block 0's attention reads in it."""
    from contextlib import contextmanager

    @contextmanager
    def wrapped(*args, **kwargs):
        with engine(*args, **kwargs) as forward:
            seen.append(model.model.layers[0].self_attn.config._attn_implementation)
            yield forward

    return wrapped


# --- layout and masks --------------------------------------------------------------------------
IDS = [
    (1, 2, 3, 4, 5, 6),  # group 0 shares (1, 2, 3, 4)
    (1, 2, 3, 4, 7),
    (1, 2, 3, 4, 8, 9, 10),
    (5, 5),  # group 1: one prompt, no prefix
    (1, 2, 3, 9, 9),  # group 2: (1, 2, 3), a prefix of group 0's
    (1, 2, 3, 8),
]
GROUPS = [[0, 1, 2], [3], [4, 5]]


# The hand layout of IDS packed: group and segment (0 = the group's prefix, k = suffix k) per token.
GROUP = [0] * 10 + [1] * 2 + [2] * 6
SEGMENT = [0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 0, 0, 0, 5, 5, 6]


def _intended(q: int, kv: int) -> bool:
    """The rule in words: a token sees earlier tokens of its group that are in the group's prefix
    or in its own suffix; padding sees itself only."""
    if q >= len(GROUP) or kv >= len(GROUP):
        return q == kv
    return GROUP[q] == GROUP[kv] and kv <= q and SEGMENT[kv] in (0, SEGMENT[q])


def test_plan_and_build_a_pack_by_hand():
    lens = group_prefix_lengths(IDS, GROUPS)
    assert lens == [4, 0, 3]
    plans = plan_packs(IDS, GROUPS, lens, budget=1000)
    assert len(plans) == 1 and plans[0].prompts == [0, 1, 2, 3, 4, 5]
    pack = build_pack(IDS, plans[0], pad_id=0, pad_to=16)
    # [1 2 3 4 | 5 6 | 7 | 8 9 10] [5 5] [1 2 3 | 9 9 | 8] + padding to 32
    assert pack.n_real == 4 + 2 + 1 + 3 + 2 + 3 + 2 + 1 and pack.length == 32
    assert pack.input_ids[0, : pack.n_real].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 5, 5, 1, 2, 3, 9, 9, 8]
    assert pack.position_ids[0, : pack.n_real].tolist() == [0, 1, 2, 3, 4, 5, 4, 4, 5, 6, 0, 1, 0, 1, 2, 3, 4, 3]
    assert pack.last.tolist() == [5, 6, 9, 11, 16, 17]
    # Each prompt's last token sees exactly its own tokens, in order.
    for prompt, last in zip(pack.prompts, pack.last.tolist(), strict=True):
        seen = [kv for kv in range(pack.length) if _intended(last, kv)]
        assert pack.input_ids[0, seen].tolist() == list(IDS[prompt])
        assert pack.position_ids[0, seen].tolist() == list(range(len(IDS[prompt])))
    mask = dense_mask(pack)[0, 0]
    for q in range(pack.length):
        for kv in range(pack.length):
            assert mask[q, kv].item() == _intended(q, kv)
    assert all(mask[q].nonzero().flatten().tolist() == [q] for q in range(pack.n_real, pack.length))  # pads: self only
    additive = dense_mask(pack, additive_dtype=torch.float32)[0, 0]
    assert torch.equal(additive == 0, mask) and additive.min().item() == torch.finfo(torch.float32).min


def test_budgets_split_groups_and_repeat_the_prefix():
    lens = group_prefix_lengths(IDS, GROUPS)
    plans = plan_packs(IDS, GROUPS, lens, budget=7)
    for plan in plans:
        assert plan.n_tokens <= 7
        assert plan.n_tokens == sum(s.prefix_len + sum(len(IDS[i]) - s.prefix_len for i in s.prompts) for s in plan.segments)
    assert sorted(i for p in plans for i in p.prompts) == list(range(len(IDS)))
    # Group 0 (4 + 2 + 1 + 3 tokens) is split, each piece with its prefix of 4.
    pieces = [s for p in plans for s in p.segments if s.prompts[0] in (0, 1, 2)]
    assert [s.prompts for s in pieces] == [(0, 1), (2,)] and all(s.prefix_len == 4 for s in pieces)
    # A prompt longer than the budget gets a pack of its own.
    assert [p.prompts for p in plan_packs(IDS, GROUPS, lens, budget=3)][:3] == [[0], [1], [2]]
    assert all(len(p.prompts) <= 2 for p in plan_packs(IDS, GROUPS, lens, budget=1000, max_prompts=2))
    with pytest.raises(ValueError, match="'prefix_lens' parameter of plan_packs"):
        plan_packs(IDS, GROUPS, [0], budget=10)


@pytest.mark.parametrize("seed", range(6))
def test_block_mask_tiles_agree_with_the_dense_mask(seed):
    """Many groups over several 128-token tiles: every tile is listed as full, partial or absent rightly."""
    g = torch.Generator().manual_seed(seed)
    ids, groups = [], []
    longest = [90, 90, 300, 20, 600, 200][seed]  # groups within a tile, across several
    for _ in range(9):
        prefix = torch.randint(1, 50, (int(torch.randint(2, longest, (1,), generator=g)),), generator=g).tolist()
        group = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            group.append(len(ids))
            ids.append(tuple(prefix + torch.randint(1, 50, (int(torch.randint(1, 70, (1,), generator=g)),), generator=g).tolist()))
        groups.append(group)
    plans = plan_packs(ids, groups, group_prefix_lengths(ids, groups), budget=1000)
    padded = build_pack(ids, plans[0], pad_id=0, pad_to=BLOCK)
    unpadded = build_pack(ids, plans[0], pad_id=0)  # the default: a last, partial tile
    assert padded.length % BLOCK == 0 and padded.length >= 2 * BLOCK
    assert unpadded.length == unpadded.n_real == padded.n_real
    for pack in (padded, unpadded):
        # Past the end of a partial tile, tokens that see only themselves.
        dense = torch.eye(padded.length, dtype=torch.bool)
        dense[: pack.length, : pack.length] = dense_mask(pack)[0, 0]
        nb = padded.length // BLOCK
        tiles = dense.reshape(nb, BLOCK, nb, BLOCK).sum((1, 3))
        assert torch.equal(block_counts(pack), tiles)
        # The listed tiles and the mask_mod rebuild the mask (mask_mod reads past a partial tile).
        bm = block_mask(pack)
        rebuilt = torch.zeros_like(dense)
        q = torch.arange(padded.length)
        for i in range(nb):
            rows = slice(i * BLOCK, (i + 1) * BLOCK)
            for j in bm.full_kv_indices[0, 0, i, : bm.full_kv_num_blocks[0, 0, i]].tolist():
                rebuilt[rows, j * BLOCK : (j + 1) * BLOCK] = True
            for j in bm.kv_indices[0, 0, i, : bm.kv_num_blocks[0, 0, i]].tolist():
                kv = torch.arange(j * BLOCK, (j + 1) * BLOCK)
                rebuilt[rows, j * BLOCK : (j + 1) * BLOCK] = bm.mask_mod(torch.tensor(0), torch.tensor(0), q[rows, None], kv[None, :])
        assert torch.equal(rebuilt, dense)
        assert bm.seq_lengths == (pack.length, pack.length)
        listed = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
        assert listed == int((tiles > 0).sum())
        if seed == 0:
            assert listed < nb * (nb + 1) // 2  # sparse: not every causal tile


def test_flex_attention_under_the_block_mask_equals_attention_under_the_dense_mask():
    """FlexAttention (eager, on the CPU) with ``block_mask`` against SDPA with ``dense_mask``, on a
    pack of several groups whose length is no multiple of the 128-token tile."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(1)
    ids, groups = [], []
    for k in range(6):
        prefix = torch.randint(1, 50, (10 + 17 * k,), generator=g).tolist()
        groups.append([len(ids) + j for j in range(k % 3 + 1)])
        ids += [tuple(prefix + torch.randint(1, 50, (5 + 11 * j,), generator=g).tolist()) for j in range(k % 3 + 1)]
    pack = build_pack(ids, plan_packs(ids, groups, group_prefix_lengths(ids, groups), budget=4096)[0], pad_id=0)
    T = pack.length
    assert T % BLOCK and T > 2 * BLOCK
    q = torch.randn(1, 4, T, 32, generator=g)
    k, v = torch.randn(2, 1, 2, T, 32, generator=g)
    got = flex_attention(q, k, v, block_mask=block_mask(pack), enable_gqa=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(pack), enable_gqa=True)
    assert (got - want).abs().max().item() <= 1e-5


def test_pack_budget_fits_memory_and_caps_dense_packs():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28)
    flex = pack_budget(config, torch.bfloat16, "packed_flex", 1.5 * 2**30)
    per_token = 2 * (3 * 18944 + 8 * 3584)
    assert flex % BLOCK == 0 and flex <= 1.5 * 2**30 / per_token < flex + BLOCK
    assert pack_budget(config, torch.bfloat16, "packed_flex", 1.5 * 2**30, cap=1000) == 1024
    sdpa = pack_budget(config, torch.bfloat16, "packed_sdpa", 1.5 * 2**30)
    assert sdpa < flex and per_token * sdpa + 3 * sdpa**2 <= 1.5 * 2**30
    assert pack_budget(config, torch.bfloat16, "packed_flex", 1.0) == BLOCK


def test_compiled_blocks_give_the_same_activations_and_are_restored(tiny_qwen_path, monkeypatch):
    """compile_blocks runs every block through one compiled function (traced here with the eager
    backend, to skip code generation) with the hooks outside it, and puts the plain forward back."""
    import functools

    from persona_geometry import packing

    monkeypatch.setattr(packing, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    handle = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    blocks = find_layers(handle.model)[1]
    plain = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, hooks=["resid_pre", "resid_post"], progress=False)
    compiled = extract_activations(
        handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, hooks=["resid_pre", "resid_post"], compile_blocks=True, progress=False
    )
    assert compiled.manifest["compile_blocks"] and not plain.manifest["compile_blocks"]
    assert list(packing._COMPILED) == [type(blocks[0])]  # one compiled function for every block
    assert all("forward" not in b.__dict__ for b in blocks)
    for hook in ("resid_pre", "resid_post"):
        assert (compiled[hook] - plain[hook]).abs().max().item() <= 1e-5


def test_compiled_blocks_are_one_graph_after_transformers_installed_its_output_hooks(tiny_qwen_path, monkeypatch):
    """Once a model has returned ``output_hidden_states`` / ``output_attentions``, transformers
    keeps forward hooks on its attention and MLP modules that read a ``ContextVar``, which
    torch.compile cannot trace: each block split into three graphs. compile_blocks detaches
    them while it runs (one graph, no break) and gives them back (the outputs still work)."""
    import functools

    from torch._dynamo.utils import counters

    from persona_geometry import packing

    monkeypatch.setattr(packing, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    # Packs cross as on a GPU: one copy per dtype, split into tensors.
    monkeypatch.setattr(packing, "_to_device", functools.partial(packing._to_device, together=True))
    handle = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = handle.model(ids, output_hidden_states=True).hidden_states
    for block in find_layers(handle.model)[1]:  # a user's hook, first in line
        block.self_attn.register_forward_hook(lambda *a: None, prepend=True)
    hooks = {name: list(m._forward_hooks.values()) for name, m in handle.model.named_modules() if m._forward_hooks}
    assert hooks  # transformers installed its capturing hooks
    torch._dynamo.reset()
    counters.clear()
    plain = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, compile_blocks=False, progress=False)
    compiled = extract_activations(handle, PERSONAS, QUESTIONS, chat_template=TEMPLATE, compile_blocks=True, progress=False)
    # Two graphs: the blocks, and the last block with its MLP on the last tokens (rows_only).
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert (compiled["resid_post"] - plain["resid_post"]).abs().max().item() <= 1e-5
    # Other packs (other rows, another length, a single prompt) compile nothing new.
    extract_activations(handle, PERSONAS[1:], QUESTIONS[:3], chat_template=TEMPLATE, compile_blocks=True, progress=False)
    one = extract_activations(handle, PERSONAS[:1], QUESTIONS[2:3], chat_template=TEMPLATE, compile_blocks=True, progress=False)
    extract_activations(handle, PERSONAS[:1], QUESTIONS[:1], chat_template=TEMPLATE, compile_blocks=True, progress=False)  # a few tokens
    assert counters["stats"]["unique_graphs"] == 2
    assert (one["resid_post"][0, 0] - plain["resid_post"][0, 2]).abs().max().item() <= 1e-5
    after_hooks = {name: list(m._forward_hooks.values()) for name, m in handle.model.named_modules() if m._forward_hooks}
    assert after_hooks == hooks  # the same hooks, in the same order
    with torch.no_grad():
        after = handle.model(ids, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_compile_blocks_defaults_to_on_for_flex_attention_on_a_gpu_only(tiny_qwen_path):
    handle = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    acts = extract_activations(handle, PERSONAS[:1], QUESTIONS[:2], chat_template=TEMPLATE, progress=False)
    assert acts.manifest["forward"] == "packed_sdpa" and acts.manifest["compile_blocks"] is False
    with pytest.raises(TypeError, match="compile_blocks"):
        extract_activations(handle, PERSONAS[:1], QUESTIONS[:2], chat_template=TEMPLATE, compile_blocks="yes", progress=False)
