"""Steering on a tiny chat model: exact shifts checked against HF ``output_hidden_states``."""

import numpy as np
import pytest
import torch

from persona_geometry.personas import builtin_personas
from persona_geometry.probes import Direction, DoseResponse, assistant_axis, dose_response, steer
from persona_geometry.prompts import render_prompts
from persona_geometry.questions import builtin_questions

LAYER = 1


@pytest.fixture(scope="module")
def tiny(tiny_qwen_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_qwen_path)
    return model, tok


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    _, tok = tiny
    ps = render_prompts(tok, builtin_personas()[:1], builtin_questions()[:1])
    return torch.tensor([ps[0].input_ids])


def _direction(d_model=128, layers=(0, 1, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(len(layers), d_model, generator=g)
    return Direction(values=v / v.norm(dim=-1, keepdim=True), layers=tuple(layers), description="random unit")


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def _blocks(model):
    return model.model.layers


def test_strength_zero_leaves_greedy_generation_identical(tiny, prompt_ids):
    model, tok = tiny
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        ref = model.generate(input_ids=prompt_ids, **kw)
        with steer(model, _direction(), layer=LAYER, strength=0.0):
            same = model.generate(input_ids=prompt_ids, **kw)
        with torch.no_grad(), steer(model, _direction(), layer=LAYER, strength=0.0):
            logits0 = model(input_ids=prompt_ids).logits
        with steer(model, _direction(), layer=LAYER, strength=25.0):
            logits25 = model(input_ids=prompt_ids).logits
        logits = model(input_ids=prompt_ids).logits
    assert torch.equal(ref, same)
    assert torch.equal(logits0, logits)
    assert (logits25 - logits).abs().max() > 1e-2  # a large strength does change the output


def test_hooked_residual_differs_by_exactly_strength_times_direction_at_that_layer_only(tiny, prompt_ids):
    model, _ = tiny
    ref = _hidden(model, prompt_ids)  # also installs HF's own capture hooks before ours
    d = _direction()
    alpha = 3.5
    with steer(model, d, layer=LAYER, strength=alpha) as delta:
        hooked = _hidden(model, prompt_ids)
    torch.testing.assert_close(delta, alpha * d.at(LAYER))
    # hidden_states[0] is the embedding output, hidden_states[l + 1] the output of block l.
    for i in range(LAYER + 1):
        assert torch.equal(hooked[i], ref[i]), f"hidden_states[{i}] changed before the steered block"
    diff = hooked[LAYER + 1] - ref[LAYER + 1]
    expected = (alpha * d.at(LAYER)).expand_as(diff)
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=0)
    assert (hooked[LAYER + 2] - ref[LAYER + 2]).abs().max() > 1e-3  # later blocks see the shift
    # Outside the block the model is back to normal, hook gone.
    after = _hidden(model, prompt_ids)
    assert all(torch.equal(a, b) for a, b in zip(after, ref, strict=True))


def test_raw_vector_and_negative_layer(tiny, prompt_ids):
    model, _ = tiny
    ref = _hidden(model, prompt_ids)
    v = torch.randn(128, generator=torch.Generator().manual_seed(3)) * 2  # not unit: added as given
    with steer(model, v, layer=-3, strength=-0.5):  # -3 is block 1 of 4
        hooked = _hidden(model, prompt_ids)
    torch.testing.assert_close(hooked[2] - ref[2], (-0.5 * v).expand_as(ref[2]), atol=1e-5, rtol=0)
    assert torch.equal(hooked[1], ref[1])


def test_steering_a_peft_wrapped_model(tiny, prompt_ids):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    import copy

    base = copy.deepcopy(model)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.eval()
    with torch.no_grad():
        ref = lora(input_ids=prompt_ids, output_hidden_states=True).hidden_states
        d = _direction(seed=5)
        with steer(lora, d, layer=2, strength=2.0):
            hooked = lora(input_ids=prompt_ids, output_hidden_states=True).hidden_states
    assert all(torch.equal(hooked[i], ref[i]) for i in range(3))
    torch.testing.assert_close(hooked[3] - ref[3], (2.0 * d.at(2)).expand_as(ref[3]), atol=1e-5, rtol=0)
    # The adapter is active: the LoRA model's block outputs differ from the base model's.
    assert (ref[3] - _hidden(model, prompt_ids)[3]).abs().max() > 1e-4


def test_hook_is_removed_when_the_block_raises(tiny):
    model, _ = tiny
    before = len(_blocks(model)[LAYER]._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"), steer(model, _direction(), layer=LAYER, strength=1.0):
        assert len(_blocks(model)[LAYER]._forward_hooks) == before + 1
        raise RuntimeError("boom")
    assert len(_blocks(model)[LAYER]._forward_hooks) == before


def test_bad_input_names_the_parameter(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"'direction' parameter of steer must be a direction of the model's width d_model=128.*d_model=64"):
        with steer(model, _direction(d_model=64), layer=LAYER, strength=1.0):
            pass
    with pytest.raises(ValueError, match=r"'layer' parameter of steer must be an int in \[-4, 3\]. Got 4"):
        with steer(model, _direction(), layer=4, strength=1.0):
            pass
    with pytest.raises(ValueError, match=r"'layer' parameter of steer must be one of the direction's layers \[0, 2\]"):
        with steer(model, _direction(layers=(0, 2)), layer=1, strength=1.0):
            pass
    with pytest.raises(ValueError, match=r"'direction' parameter of steer must be a Direction or a tensor shaped \[d_model=128\]"):
        with steer(model, torch.zeros(64), layer=1, strength=1.0):
            pass
    assert all(len(b._forward_hooks) <= 1 for b in _blocks(model))


def test_dose_response_counts_marker_hits_as_greedy_generation_does(tiny):
    model, tok = tiny
    persona = builtin_personas()[0]
    questions = builtin_questions()[:2]
    d = _direction(seed=7)
    alphas = [0.0, 30.0]

    def greedy(alpha):
        texts = []
        for p in render_prompts(tok, [persona], questions):
            ids = torch.tensor([p.input_ids])
            with torch.no_grad(), steer(model, d, layer=LAYER, strength=alpha):
                out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return texts

    texts = {a: greedy(a) for a in alphas}
    plain = texts[0.0]
    marker = plain[0].strip()[:3].upper()  # case-insensitive match of what strength 0 writes
    assert marker
    res = dose_response(
        model, tok, d, persona=persona, layer=LAYER, strengths=alphas, questions=questions,
        marker=marker, n_completions=1, max_new_tokens=6, temperature=0.0, progress=False,
    )
    expected = [sum(marker.lower() in t.lower() for t in texts[a]) for a in alphas]
    assert res.k.tolist() == expected and res.n.tolist() == [2, 2]
    assert res.k[0] >= 1
    assert [list(c) for c in res.completions] == [texts[a] for a in alphas]
    frame = res.to_frame()
    assert list(frame["strength"]) == alphas and "rate" in frame


def test_dose_response_with_a_custom_counter_runs_it_inside_the_steering(tiny, tmp_path):
    import json

    from statsmodels.stats.proportion import proportion_confint

    model, tok = tiny
    calls = []

    def counter(m, t, persona, questions):
        calls.append(len(_blocks(model)[LAYER]._forward_hooks))
        k = [0, 3, 7, 9][len(calls) - 1]
        return k, 10, ["x"] * 10

    before = len(_blocks(model)[LAYER]._forward_hooks)
    res = dose_response(
        model, tok, _direction(), persona=builtin_personas()[1], layer=LAYER,
        strengths=[-2, 0, 2, 4], questions=["q?"], counter=counter, progress=False, out_path=tmp_path / "dr.json",
    )
    saved = json.loads((tmp_path / "dr.json").read_text())
    assert saved["k"] == [0, 3, 7, 9] and saved["settings"]["custom_counter"] is True and "torch" in saved["package_versions"]
    assert calls == [before + 1] * 4
    assert isinstance(res, DoseResponse) and res.rate.tolist() == [0.0, 0.3, 0.7, 0.9]
    for i, k in enumerate([0, 3, 7, 9]):
        lo, hi = proportion_confint(k, 10, alpha=0.05, method="wilson")
        assert res.ci_low[i] == pytest.approx(lo) and res.ci_high[i] == pytest.approx(hi)
    rho, p = res.spearman()
    assert rho == pytest.approx(1.0)
    assert res.to_dict()["spearman_rho"] == pytest.approx(1.0)
    assert "Spearman" in res.summary()
    with pytest.raises(ValueError, match="'strengths' parameter of dose_response"):
        dose_response(model, tok, _direction(), persona=builtin_personas()[1], layer=LAYER, strengths=[], questions=["q?"], counter=counter)
    np.testing.assert_array_equal(res.strengths, [-2.0, 0.0, 2.0, 4.0])


def test_extraction_inside_steer_sees_the_shift_on_a_model_handle(tiny_qwen_path):
    # End to end with the core pieces: a direction from extracted activations, steering a
    # ModelHandle, and the extractor's own block hooks as the second reference.
    from persona_geometry.extract import extract_activations
    from persona_geometry.models import load_model

    handle = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    ps, qs = builtin_personas()[:4], builtin_questions()[:2]
    acts = extract_activations(handle, ps, qs, progress=False)
    axis = assistant_axis(acts)
    with steer(handle, axis, layer=2, strength=-4.0):
        steered = extract_activations(handle, ps, qs, progress=False)
    x, y = acts["resid_post"], steered["resid_post"]
    torch.testing.assert_close(x[:, :, :2], y[:, :, :2], atol=1e-5, rtol=0)  # blocks 0 and 1 untouched
    torch.testing.assert_close(y[:, :, 2] - x[:, :, 2], (-4.0 * axis.at(2)).expand_as(x[:, :, 2]).float(), atol=1e-5, rtol=0)
    assert (y[:, :, 3] - x[:, :, 3]).abs().max() > 1e-3


def test_dose_response_accepts_a_model_handle(tiny_qwen_path):
    from persona_geometry.models import load_model

    handle = load_model(str(tiny_qwen_path), dtype="float32")
    questions = builtin_questions()[:2]
    kw = dict(persona=builtin_personas()[0], layer=LAYER, strengths=[0.0, 30.0], questions=questions, marker="a",
              n_completions=1, max_new_tokens=6, temperature=0.0, progress=False)  # fmt: skip
    by_handle = dose_response(handle, handle.tokenizer, _direction(seed=7), **kw)
    by_model = dose_response(handle.model, handle.tokenizer, _direction(seed=7), **kw)
    assert [list(c) for c in by_handle.completions] == [list(c) for c in by_model.completions]
    assert by_handle.n.tolist() == [2, 2]


def test_the_old_alpha_names_still_work_with_a_deprecation_warning(tiny, prompt_ids):
    model, _ = tiny
    d = _direction()
    with pytest.warns(DeprecationWarning, match="'alpha' parameter of steer is renamed 'strength'"):
        with steer(model, d, layer=LAYER, alpha=2.0) as old:
            pass
    with steer(model, d, layer=LAYER, strength=2.0) as new:
        pass
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.raises(TypeError, match="'alpha' parameter of steer must be left out"):
        with steer(model, d, layer=LAYER, strength=1.0, alpha=1.0):
            pass


def test_a_relative_and_an_absolute_path_are_the_same_model(tiny, tiny_qwen_path, caplog, monkeypatch):
    import dataclasses
    import logging
    import os

    model, _ = tiny
    monkeypatch.chdir(tiny_qwen_path.parent)
    relative = os.path.relpath(tiny_qwen_path)
    model.config._name_or_path = str(tiny_qwen_path.resolve())
    same = dataclasses.replace(_direction(), model_id=relative)
    other = dataclasses.replace(_direction(), model_id="Qwen/Qwen2.5-7B-Instruct")
    with caplog.at_level(logging.WARNING, logger="persona_geometry.probes.steering"):
        with steer(model, same, layer=LAYER, strength=1.0):
            pass
        assert "computed on" not in caplog.text
        with steer(model, other, layer=LAYER, strength=1.0):
            pass
    assert "computed on Qwen/Qwen2.5-7B-Instruct" in caplog.text
