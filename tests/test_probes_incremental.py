"""Incremental follow-ups: joining cached sets, recentering without a model, extending with one."""

import numpy as np
import pytest
import torch

from persona_geometry.activations import ActivationSet
from persona_geometry.geometry import center, centroids, cosine_to_reference
from persona_geometry.personas import builtin_personas
from persona_geometry.probes import concat_personas, concat_questions, extend, recenter


def _acts(seed=0, personas=slice(0, 5), Q=4, L=3, D=16, manifest=None):
    rng = np.random.default_rng(seed)
    ps = builtin_personas()[personas]
    x = rng.normal(size=(len(ps), Q, L, D)) + 2.0
    return ActivationSet(
        {"resid_post": torch.tensor(x, dtype=torch.float64)},
        personas=ps,
        questions=[f"q{seed}_{i}?" for i in range(Q)],
        layers=[0, 2, 5],
        n_tokens=torch.arange(len(ps) * Q).reshape(len(ps), Q),
        manifest=manifest or {"model_id": "tiny/test", "dtype": "float64"},
    ), x


def _np_cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_recenter_on_another_cached_set_matches_numpy():
    acts, x = _acts()
    fixed, y = _acts(seed=1, personas=slice(5, 12))
    cos = recenter(acts, fixed, reference="helpful_assistant")
    c = x.mean(axis=1) - y.mean(axis=1).mean(axis=0)
    np.testing.assert_allclose(cos.values.numpy(), _np_cos(c, c[0][None]), atol=1e-12)
    assert cos.centered_on == tuple(fixed.personas.names)
    # The default is the geometry module's default: center on the personas analysed.
    same = cosine_to_reference(center(centroids(acts)), "helpful_assistant")
    torch.testing.assert_close(recenter(acts).values, same.values)
    sub = recenter(centroids(acts), ["qwen_default", "librarian"], reference="librarian")
    c = x.mean(axis=1)
    c = c - c[[1, 4]].mean(axis=0)
    np.testing.assert_allclose(sub.values.numpy(), _np_cos(c, c[4][None]), atol=1e-12)


def test_recenter_refuses_a_set_from_another_model_or_layers():
    acts, _ = _acts()
    other_model, _ = _acts(seed=1, personas=slice(5, 12), manifest={"model_id": "other/model"})
    with pytest.raises(ValueError, match=r"'centering' parameter of recenter must produce activations from the same model.*model_id: cached 'tiny/test' vs 'other/model'"):
        recenter(acts, other_model)
    other_layers, _ = _acts(seed=1, personas=slice(5, 12))
    with pytest.raises(ValueError, match="'centering' parameter of recenter must be a set on layers"):
        recenter(acts, other_layers.select(layers=[0, 2]))


def test_concat_personas_and_questions_keep_labels_aligned():
    a, x = _acts()
    b, y = _acts(seed=0, personas=slice(5, 8))
    both = concat_personas(a, b)
    np.testing.assert_array_equal(both["resid_post"].numpy(), np.concatenate([x, y], axis=0))
    assert both.personas.names == a.personas.names + b.personas.names
    assert torch.equal(both.n_tokens, torch.cat([a.n_tokens, b.n_tokens]))

    c, z = _acts(seed=2)
    wide = concat_questions(a, c)
    np.testing.assert_array_equal(wide["resid_post"].numpy(), np.concatenate([x, z], axis=1))
    assert wide.questions == a.questions + c.questions
    with pytest.raises(ValueError, match="'b' parameter of concat_personas must be personas not already in 'a'"):
        concat_personas(a, a)
    with pytest.raises(ValueError, match="'b' parameter of concat_questions must be questions not already in 'a'"):
        concat_questions(a, a)
    with pytest.raises(ValueError, match="'b' parameter of concat_personas must be activations on the same questions"):
        concat_personas(a, _acts(seed=3, personas=slice(5, 8))[0])
    with pytest.raises(ValueError, match=r"'b' parameter of concat_questions must produce activations from the same model.*dtype: cached 'float64' vs 'bfloat16'"):
        concat_questions(a, _acts(seed=2, manifest={"model_id": "tiny/test", "dtype": "bfloat16"})[0])


def test_extend_equals_a_full_extraction_running_only_the_new_prompts(qwen, tmp_path, monkeypatch):
    import persona_geometry.extract as extract_mod
    from persona_geometry.extract import extract_activations
    from persona_geometry.questions import builtin_questions

    ps, qs = builtin_personas(), builtin_questions()
    cached = extract_activations(qwen, ps[:3], qs[:3], progress=False)
    run = []
    real = extract_mod.extract_activations

    def counting(model, personas, questions, **kw):
        run.append((list(personas.names), list(questions)))
        return real(model, personas, questions, **kw)

    monkeypatch.setattr(extract_mod, "extract_activations", counting)
    grown = extend(cached, qwen, personas=list(ps[3:5]), questions=qs[3:5], progress=False)
    monkeypatch.undo()
    # Cached personas on the new questions, new personas on every question: 6 + 10 prompts, not 25.
    assert run == [(ps.names[:3], qs[3:5]), (ps.names[3:5], qs[:5])]

    full = extract_activations(qwen, ps[:5], qs[:5], progress=False)
    assert grown.personas.names == full.personas.names and grown.questions == full.questions
    torch.testing.assert_close(grown["resid_post"], full["resid_post"], atol=1e-5, rtol=0)
    assert torch.equal(grown.n_tokens, full.n_tokens)
    # Same content hashes as the full extraction: same cache key.
    for key in ("persona_hash", "question_hash", "prompt_ids_hash", "cache_key"):
        assert grown.manifest[key] == full.manifest[key], key
    assert grown.manifest["extended_from"] == cached.manifest["cache_key"]
    back = ActivationSet.load(grown.save(tmp_path / "grown"))
    torch.testing.assert_close(back["resid_post"], grown["resid_post"])


def test_extend_refuses_another_model_dtype_or_template(qwen, tiny_llama_path):
    from persona_geometry.extract import extract_activations
    from persona_geometry.models import load_model
    from persona_geometry.questions import builtin_questions

    ps, qs = builtin_personas(), builtin_questions()
    cached = extract_activations(qwen, ps[:2], qs[:2], progress=False)
    new = [ps[5]]
    llama = load_model(tiny_llama_path, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match=r"'model' parameter of extend must produce activations from the same model.*model_id"):
        extend(cached, llama, personas=new, progress=False)
    bf16 = load_model(qwen.path, dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match=r"'model' parameter of extend.*dtype: cached 'float32' vs 'bfloat16'"):
        extend(cached, bf16, personas=new, progress=False)
    other_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    with pytest.raises(ValueError, match=r"'model' parameter of extend.*chat_template_hash"):
        extend(cached, qwen, personas=new, chat_template=other_template, progress=False)
    with pytest.raises(ValueError, match=r"'personas' parameter of extend must be personas not already in the cached set"):
        extend(cached, qwen, personas=[ps[0]], progress=False)
    with pytest.raises(ValueError, match=r"'questions' parameter of extend must be questions not already in the cached set"):
        extend(cached, qwen, questions=[qs[1]], progress=False)
    with pytest.raises(ValueError, match=r"'personas' parameter of extend must be a non-empty list"):
        extend(cached, qwen, progress=False)
