"""Extraction against an independent reference: HF ``output_hidden_states``, one prompt at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from persona_geometry import (
    ModelHandle,
    builtin_personas,
    builtin_questions,
    extract_activations,
    hook_name,
    load_model,
    render_prompts,
)
from persona_geometry.extract import plan_batches
from persona_geometry.hooks import find_layers, record_last_token

PERSONAS = builtin_personas().select(["helpful_assistant", "kindergarten_teacher", "villain"])
# Questions of clearly different lengths, so one batch mixes prompt lengths.
QUESTIONS = [builtin_questions()[i] for i in (0, 3, 7, 12)]


def reference(handle: ModelHandle, personas=PERSONAS, questions=QUESTIONS, ids=None) -> torch.Tensor:
    """Returns ``[persona, question, layer, d_model]`` from unpadded single-prompt forwards (of
    ``ids``, persona-major, if given; else of ``render_prompts``' prompts).

    Layer l < L-1 is ``hidden_states[l + 1]``; the last block's output comes from a hook on
    that block, because HF's last hidden state has the final norm applied.
    """
    model = handle.model
    _, blocks = find_layers(model)
    n_layers = len(blocks)
    if ids is None:
        ids = [p.input_ids for p in render_prompts(handle.tokenizer, personas, questions)]
    rows = []
    captured = {}
    for input_ids in ids:
        captured.clear()
        h = blocks[-1].register_forward_hook(lambda m, a, o: captured.__setitem__("out", o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad():
                hs = model(torch.tensor([list(input_ids)]), output_hidden_states=True).hidden_states
        finally:
            h.remove()
        assert len(hs) == n_layers + 1
        rows.append(torch.stack([hs[layer + 1][0, -1] for layer in range(n_layers - 1)] + [captured["out"][0, -1]]))
    return torch.stack(rows).reshape(len(personas), len(questions), n_layers, -1).float()


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_hf_engine_matches_one_prompt_at_a_time_reference(family, request):
    handle = request.getfixturevalue(family)
    acts = extract_activations(handle, PERSONAS, QUESTIONS, batch_tokens=100_000, progress=False)
    lengths = acts.n_tokens.flatten().tolist()
    assert len(set(lengths)) >= 3  # one batch really mixes lengths (left padding is exercised)
    assert len(plan_batches(lengths, 100_000)) == 1
    ref = reference(handle)
    got = acts["resid_post"]
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert acts.layers == tuple(range(ref.shape[2]))
    assert (got - ref).abs().max().item() <= 1e-5
    assert acts.manifest["engine"] == "hf" and acts.manifest["dtype"] == "float32"


def test_last_layer_is_the_block_output_not_the_post_norm_hidden_state(qwen):
    """HF's last hidden state is norm(block output): the two differ, and only the first is used."""
    prompt = render_prompts(qwen.tokenizer, PERSONAS, QUESTIONS)[0]
    with torch.no_grad():
        hs = qwen.model(torch.tensor([prompt.input_ids]), output_hidden_states=True).hidden_states
    acts = extract_activations(qwen, PERSONAS[:1], QUESTIONS[:1], progress=False)
    last_block = acts["resid_post"][0, 0, -1]
    post_norm = hs[-1][0, -1]
    assert (last_block - post_norm).abs().max().item() > 1e-2
    with torch.no_grad():
        assert torch.allclose(qwen.model.model.norm(last_block), post_norm, atol=1e-5)


def test_hf_engine_resid_pre_is_the_previous_block_output_and_the_embedding(qwen):
    acts = extract_activations(qwen, PERSONAS, QUESTIONS[:2], hooks=["resid_pre", "resid_post"], progress=False)
    pre, post = acts["resid_pre"], acts["resid_post"]
    assert torch.equal(pre[:, :, 1:], post[:, :, :-1])
    prompts = render_prompts(qwen.tokenizer, PERSONAS, QUESTIONS[:2])
    last_ids = torch.tensor([p.input_ids[-1] for p in prompts])
    emb = qwen.model.get_input_embeddings().weight[last_ids].detach()
    assert torch.allclose(pre[:, :, 0].reshape(-1, emb.shape[-1]), emb, atol=0)


def test_results_do_not_depend_on_batch_size_or_prompt_order(qwen):
    big = extract_activations(qwen, PERSONAS, QUESTIONS, layers=[0, 3], batch_tokens=100_000, progress=False)
    single = extract_activations(qwen, PERSONAS, QUESTIONS, layers=[0, 3], max_batch_size=1, progress=False)
    small = extract_activations(qwen, PERSONAS, QUESTIONS, layers=[0, 3], batch_tokens=150, progress=False)
    reordered = extract_activations(qwen, PERSONAS[::-1], QUESTIONS[::-1], layers=[0, 3], progress=False)
    for other in (single, small):
        assert (big["resid_post"] - other["resid_post"]).abs().max().item() <= 1e-5
    flipped = reordered["resid_post"].flip(0).flip(1)
    assert (big["resid_post"] - flipped).abs().max().item() <= 1e-5
    assert torch.equal(reordered.n_tokens.flip(0).flip(1), big.n_tokens)


def test_layer_subset_and_negative_layers(qwen):
    full = extract_activations(qwen, PERSONAS, QUESTIONS[:2], progress=False)
    sub = extract_activations(qwen, PERSONAS, QUESTIONS[:2], layers=[-1, 1], progress=False)
    assert sub.layers == (1, 3)
    assert (sub["resid_post"] - full["resid_post"][:, :, [1, 3]]).abs().max().item() <= 1e-5


def test_plan_batches_respects_the_token_budget_and_sorts_by_length():
    lengths = [5, 30, 12, 30, 7, 100, 1]
    batches = plan_batches(lengths, batch_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [5]  # longer than the budget: alone
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for b in batches[1:]:
        assert len(b) * max(lengths[i] for i in b) <= 64
    assert all(len(b) <= 2 for b in plan_batches(lengths, 10_000, max_batch_size=2))


def test_gpt2_family_blocks_are_found_and_match_the_reference(tiny_tokenizer):
    """GPT-2 has learned absolute positions: wrong position ids under left padding would show."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=3, n_head=2, n_positions=256)
    model = GPT2LMHeadModel(config).eval()
    assert find_layers(model)[0] == "transformer.h.{num}"
    handle = ModelHandle(
        model=model, tokenizer=tiny_tokenizer, model_id="tiny-gpt2", revision=None,
        dtype=torch.float32, device=torch.device("cpu"), weights_id="test",
    )
    acts = extract_activations(handle, PERSONAS, QUESTIONS, batch_tokens=100_000, progress=False)
    assert (acts["resid_post"] - reference(handle)).abs().max().item() <= 1e-5


def test_hook_names_and_layer_templates(qwen):
    assert hook_name(20) == "blocks.20.hook_resid_post"
    assert hook_name(0, "mlp_out") == "blocks.0.hook_mlp_out"
    with pytest.raises(ValueError, match="'point' parameter of hook_name"):
        hook_name(1, "hook_resid_post")
    template, blocks = find_layers(qwen.model, "model.layers.{num}")
    assert template == "model.layers.{num}" and len(blocks) == 4
    assert find_layers(qwen.model.model)[1][0] is blocks[0]  # a bare base model works too
    with pytest.raises(ValueError, match="'layer_template' parameter of find_layers"):
        find_layers(qwen.model, "transformer.h.{num}")
    with pytest.raises(ValueError, match="'layer_template' parameter of find_layers"):
        find_layers(qwen.model, "model.layers")


def test_hooks_are_removed_even_when_the_forward_fails(qwen):
    blocks = find_layers(qwen.model)[1]
    before = [(dict(b._forward_hooks), dict(b._forward_pre_hooks)) for b in blocks]
    with pytest.raises(RuntimeError, match="boom"), record_last_token(qwen.model, [0, 2], points=["resid_pre", "resid_post"]) as recorder:
        assert len(blocks[0]._forward_hooks) == len(before[0][0]) + 1
        assert len(blocks[2]._forward_pre_hooks) == len(before[2][1]) + 1
        recorder.run(lambda: (_ for _ in ()).throw(RuntimeError("boom")), 1)
    assert [(dict(b._forward_hooks), dict(b._forward_pre_hooks)) for b in blocks] == before


def test_bfloat16_extraction_is_close_to_float32(tiny_qwen_path, qwen):
    bf16 = load_model(tiny_qwen_path, dtype="bfloat16", device="cpu")
    assert bf16.dtype == torch.bfloat16
    a16 = extract_activations(bf16, PERSONAS, QUESTIONS[:2], progress=False)
    a32 = extract_activations(qwen, PERSONAS, QUESTIONS[:2], progress=False)
    assert a16.dtype == torch.float32 and a16.manifest["dtype"] == "bfloat16"
    rel = (a16["resid_post"] - a32["resid_post"]).norm() / a32["resid_post"].norm()
    assert 0 < rel.item() < 0.05


# --- TransformerLens engine -----------------------------------------------------------------
@pytest.mark.tl
@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_transformer_lens_engine_matches_reference_and_hf_engine(family, request):
    pytest.importorskip("transformer_lens")
    handle = request.getfixturevalue(family)
    tl = extract_activations(handle, PERSONAS, QUESTIONS, engine="transformer_lens", batch_tokens=100_000, progress=False)
    assert tl.manifest["engine"] == "transformer_lens"
    assert (tl["resid_post"] - reference(handle)).abs().max().item() <= 1e-5
    hf = extract_activations(handle, PERSONAS, QUESTIONS, progress=False)
    assert (tl["resid_post"] - hf["resid_post"]).abs().max().item() <= 1e-5
    # The bridge wrapped a copy: the handle's own model is untouched and still uses its blocks.
    assert type(find_layers(handle.model)[1][0]).__name__.endswith("DecoderLayer")


@pytest.mark.tl
def test_transformer_lens_hook_points_are_consistent(qwen):
    pytest.importorskip("transformer_lens")
    acts = extract_activations(
        qwen, PERSONAS, QUESTIONS[:2], engine="transformer_lens",
        hooks=["resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post"], layers=[0, 2], progress=False,
    )
    pre, mid, attn, mlp, post = (acts[h] for h in ["resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post"])
    assert (pre + attn - mid).abs().max().item() <= 1e-5
    assert (mid + mlp - post).abs().max().item() <= 1e-5
    assert attn.abs().max().item() > 1e-3 and mlp.abs().max().item() > 1e-3
    ref = reference(qwen, PERSONAS, QUESTIONS[:2])
    assert (post - ref[:, :, [0, 2]]).abs().max().item() <= 1e-5
    assert (pre[:, :, 1] - ref[:, :, 1]).abs().max().item() <= 1e-5  # resid_pre of 2 = output of 1


@pytest.mark.tl
def test_a_transformer_bridge_the_user_holds_can_be_passed(tiny_qwen_path, qwen):
    pytest.importorskip("transformer_lens")
    import copy

    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        str(tiny_qwen_path), hf_model=copy.deepcopy(qwen.model), tokenizer=copy.deepcopy(qwen.tokenizer), device="cpu"
    )
    acts = extract_activations(bridge, PERSONAS, QUESTIONS[:2], hooks="mlp_out", layers=[1], progress=False)
    assert acts.manifest["engine"] == "transformer_lens" and acts.manifest["weights_id"].startswith("params:")
    assert acts["mlp_out"].shape == (3, 2, 1, 128)
    with pytest.raises(ValueError, match="'engine' parameter of extract_activations"):
        extract_activations(bridge, PERSONAS, QUESTIONS[:2], engine="hf", progress=False)


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"hooks": ["resid_final"]}, "hooks"),
        ({"hooks": ["attn_out"]}, "hooks"),  # not an hf-engine hook point
        ({"hooks": []}, "hooks"),
        ({"layers": [4]}, "layers"),
        ({"layers": [-5]}, "layers"),
        ({"engine": "vllm"}, "engine"),
        ({"batch_tokens": 0}, "batch_tokens"),
        ({"dtype": "float32"}, "dtype"),  # the handle is already loaded
    ],
)
def test_bad_arguments_name_the_parameter(qwen, kwargs, param):
    with pytest.raises((ValueError, TypeError), match=f"'{param}' parameter of extract_activations"):
        extract_activations(qwen, PERSONAS, QUESTIONS, progress=False, **kwargs)


def test_bad_personas_questions_and_templates_name_the_parameter(qwen):
    p = list(PERSONAS)
    with pytest.raises(ValueError, match="'personas' parameter of extract_activations"):
        extract_activations(qwen, [], QUESTIONS, progress=False)
    with pytest.raises(ValueError, match="'personas' parameter of extract_activations.*twice"):
        extract_activations(qwen, [p[0], p[1], p[0]], QUESTIONS, progress=False)
    with pytest.raises(ValueError, match="'questions' parameter of extract_activations"):
        extract_activations(qwen, PERSONAS, ["Why?", "Why?"], progress=False)
    with pytest.raises(TypeError, match="'questions' parameter of extract_activations"):
        extract_activations(qwen, PERSONAS, "Why?", progress=False)
    with pytest.raises(TypeError, match="'model' parameter of extract_activations"):
        extract_activations(42, PERSONAS, QUESTIONS, progress=False)
    import copy

    bare = copy.deepcopy(qwen.tokenizer)
    bare.chat_template = None
    no_template = dataclasses.replace(qwen, tokenizer=bare)
    with pytest.raises(ValueError, match="'chat_template' parameter of extract_activations"):
        extract_activations(no_template, PERSONAS, QUESTIONS, progress=False)
    # ... and a template passed explicitly makes it work.
    from persona_geometry.tiny import CHATML_TEMPLATE

    acts = extract_activations(no_template, PERSONAS, QUESTIONS[:1], chat_template=CHATML_TEMPLATE, progress=False)
    ref = extract_activations(qwen, PERSONAS, QUESTIONS[:1], progress=False)
    assert torch.equal(acts["resid_post"], ref["resid_post"])


def test_a_path_is_loaded_with_load_model(tiny_llama_path, llama):
    acts = extract_activations(str(tiny_llama_path), PERSONAS, QUESTIONS[:1], device="cpu", dtype="float32", progress=False)
    ref = extract_activations(llama, PERSONAS, QUESTIONS[:1], progress=False)
    assert torch.equal(acts["resid_post"], ref["resid_post"])
    assert acts.manifest["weights_id"] == llama.weights_id


def test_chunk_rows_land_at_their_positions_whether_consecutive_or_not():
    from persona_geometry.landing import copy_rows as _copy_rows
    from persona_geometry.landing import finish_copies as _finish_copies

    full = torch.arange(6 * 2 * 3, dtype=torch.float32).reshape(6, 2, 3)
    flat: dict = {}
    for order in ([0, 1], [3, 5], [2, 4]):  # a run of rows, then two scattered chunks
        _copy_rows(flat, order, {"resid_post": full[order].clone()}, 6)
    _finish_copies(flat)
    assert torch.equal(flat["resid_post"], full)
    whole = full.clone()
    one: dict = {}
    _copy_rows(one, list(range(6)), {"resid_post": whole}, 6)
    assert one["resid_post"] is whole  # one chunk of every row on the CPU: no copy


def test_the_tail_layers_go_to_their_place_in_one_strided_copy(monkeypatch):
    """``copy_2d_async`` hands cudaMemcpy2DAsync the rows' pitches and width: emulated here with
    one memmove per row (what the runtime does), the tail layers land in their place in the
    result and nothing else changes; layouts whose rows are not contiguous are refused."""
    import ctypes

    from persona_geometry import landing

    def memcpy_2d(dst, dpitch, src, spitch, width, height, kind, stream):
        assert kind == 2 and width <= min(dpitch, spitch)
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return 0

    monkeypatch.setattr(landing, "_cuda_memcpy_2d", lambda: memcpy_2d)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    result = torch.zeros(10, 5, 7)
    rows = torch.randn(3, 5, 7)
    assert landing.copy_2d_async(result[4:7, -2:], rows[:, -2:])
    expected = torch.zeros(10, 5, 7)
    expected[4:7, -2:] = rows[:, -2:]
    assert torch.equal(result, expected)
    assert not landing.copy_2d_async(result[4:7, :, ::2], rows[:, :, ::2])  # rows not contiguous
    assert not landing.copy_2d_async(result[4:7, -2:], rows[:, -3:-1].double())  # dtypes differ
    monkeypatch.setattr(landing, "_cuda_memcpy_2d", lambda: None)  # no CUDA runtime found
    assert not landing.copy_2d_async(result[4:7, -2:], rows[:, -2:])


@pytest.mark.parametrize(
    ("batch_tokens", "layers"), [(None, None), (256, None), (256, [0, -1])], ids=["one-pack", "packs", "two-layers"]
)
def test_packed_rows_land_on_the_host_as_each_pack_finishes(qwen, monkeypatch, batch_tokens, layers):
    """A packed run on a GPU copies each pack's rows straight into its slice of the result, and
    the last pack's rows while its last two blocks run (those two layers after): run here on the
    CPU, with the layers not yet computed when the early copy leaves poisoned, the result equals
    the run without it and one prompt at a time, and the two tail layers were put in place."""
    from persona_geometry import extract as extract_module
    from persona_geometry.landing import Landing

    landings = []

    def cpu_landing(req, plan, units):
        landing = Landing(torch.device("cpu"), sum(len(u.prompts) for u in units))
        early = landing.early

        def poisoned_early(a, b):
            on_layer = early(a, b)

            def poison_then_copy(position, buffers):
                for t in buffers.values():
                    t[:, position + 1 :] = float("nan")  # not computed yet when the copy leaves
                on_layer(position, buffers)

            return poison_then_copy

        landing.early = poisoned_early
        finish = landing.finish
        landing.finish = lambda: (landings.append(len(landing._patches)), finish())
        return landing

    kwargs = dict(hooks=["resid_post", "resid_pre"], batch_tokens=batch_tokens, layers=layers, progress=False)
    plain = extract_activations(qwen, PERSONAS, QUESTIONS, **kwargs)
    monkeypatch.setattr(extract_module, "_landing_for", cpu_landing)
    landed = extract_activations(qwen, PERSONAS, QUESTIONS, **kwargs)
    n_layers = len(landed.layers)
    # Every hook's tail patched when the early copy ran (more than two layers), none otherwise.
    assert landings == [2 if n_layers > 2 else 0]
    assert landed.manifest["forward"] == plain.manifest["forward"] == "packed_sdpa"
    if batch_tokens is not None:
        assert landed.manifest["batch_tokens"] == 256  # several packs
    for hook in ("resid_post", "resid_pre"):
        assert not landed[hook].is_inference()  # the user's to modify
        assert not landed[hook].isnan().any()
        assert torch.equal(landed[hook], plain[hook])
    full = reference(qwen)
    picked = full[:, :, list(landed.layers)]
    assert (landed["resid_post"] - picked).abs().max().item() <= 1e-5


def test_prompts_that_fail_the_checks_run_while_the_first_forward_runs_are_rendered_again(qwen, monkeypatch, caplog):
    """Extraction starts on prompts rendered once per persona and checks them while the first
    forward runs; a template that renders a question differently for one persona fails the
    check, and the extraction starts again on every prompt rendered alone."""
    import logging

    from persona_geometry import prompts as prompts_module

    monkeypatch.setattr(prompts_module, "_FAILED_DEFERRED", set())
    template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'user' and 'pirate' in messages[0]['content'] %}"
        "{{ message['content'] | trim }}{% else %}{{ message['content'] }}{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    # The pirate first: the checks render every question with the first persona.
    personas = [dataclasses.replace(PERSONAS[1], system_prompt="You are a pirate."), PERSONAS[0], PERSONAS[2]]
    questions = [QUESTIONS[0], "  " + QUESTIONS[1] + "  ", QUESTIONS[2]]
    texts = [
        qwen.tokenizer.apply_chat_template(
            [{"role": "system", "content": p.system_prompt}, {"role": "user", "content": q}],
            chat_template=template, tokenize=False, add_generation_prompt=True,
        )
        for p in personas for q in questions
    ]  # fmt: skip
    ids = qwen.tokenizer(texts, add_special_tokens=False)["input_ids"]
    first_block = find_layers(qwen.model)[1][0]
    forwards = []
    hook = first_block.register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        runs = []
        for _ in range(2):
            forwards.clear()
            with caplog.at_level(logging.INFO, logger="persona_geometry.extract"):
                caplog.clear()
                acts = extract_activations(qwen, personas, questions, chat_template=template, batch_tokens=128, progress=False)
            again = [r for r in caplog.records if "starting again" in r.getMessage()]
            runs.append((len(forwards), len(again), acts))
    finally:
        hook.remove()
    (first, again_first, acts), (second, again_second, acts2) = runs
    assert second >= 2  # several packs, so the check stopped the first run early
    assert (again_first, again_second) == (1, 0)
    assert first == second + 1  # one pack thrown away, once: the template is checked first after
    assert acts.n_tokens.flatten().tolist() == [len(x) for x in ids]
    ref = reference(qwen, personas, questions, ids=ids)
    assert (acts["resid_post"] - ref).abs().max().item() <= 1e-5
    assert torch.equal(acts["resid_post"], acts2["resid_post"])
