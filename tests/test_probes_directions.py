"""Difference-of-means directions, the assistant axis and projections, against numpy written here."""

import json

import numpy as np
import pytest
import torch

from persona_geometry.activations import ActivationSet
from persona_geometry.geometry import Centering, center, centroids, cosine_to_reference
from persona_geometry.personas import builtin_personas
from persona_geometry.probes import Direction, assistant_axis, mean_difference, project


def _acts(seed=0, P=6, Q=5, L=3, D=16, manifest=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(P, Q, L, D)) + rng.normal(size=(1, 1, L, D)) * 3
    acts = ActivationSet(
        {"resid_post": torch.tensor(x, dtype=torch.float64)},
        personas=builtin_personas()[:P],
        questions=[f"q{i}?" for i in range(Q)],
        layers=[0, 2, 5],
        n_tokens=torch.full((P, Q), 7),
        manifest=manifest or {"model_id": "tiny/test"},
    )
    return acts, x


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_mean_difference_matches_numpy():
    acts, x = _acts()
    c = x.mean(axis=1)  # [P, L, D]
    names = acts.personas.names
    d = mean_difference(acts, [names[0], names[2]], [names[1], names[3], names[5]])
    raw = c[[0, 2]].mean(axis=0) - c[[1, 3, 5]].mean(axis=0)
    np.testing.assert_allclose(d.values.numpy(), _unit(raw), atol=1e-12)
    np.testing.assert_allclose(d.norms.numpy(), np.linalg.norm(raw, axis=-1), atol=1e-12)
    assert d.layers == (0, 2, 5) and d.d_model == 16 and d.model_id == "tiny/test"
    assert d.positive == (names[0], names[2]) and d.negative == (names[1], names[3], names[5])

    # One persona against the rest, unnormalised, on a subset of layers, from centroids.
    d = mean_difference(centroids(acts), names[4], layers=[5], normalize=False)
    rest = [i for i in range(6) if i != 4]
    np.testing.assert_allclose(d.values.numpy(), (c[4] - c[rest].mean(axis=0))[[2]], atol=1e-12)
    assert d.layers == (5,) and d.negative == tuple(names[i] for i in rest)


def test_mean_difference_is_invariant_to_centering():
    acts, _ = _acts()
    cents = centroids(acts)
    a = mean_difference(cents, ["medical_doctor", "data_scientist"])
    b = mean_difference(center(cents, ["librarian", "qwen_default"]), ["medical_doctor", "data_scientist"])
    np.testing.assert_allclose(a.values.numpy(), b.values.numpy(), atol=1e-12)


def test_assistant_axis_agrees_with_centered_cosine():
    acts, x = _acts()
    c = x.mean(axis=1)
    axis = assistant_axis(acts)
    # Centered on every persona, the axis is ref − mean(others) up to a positive factor.
    np.testing.assert_allclose(axis.values.numpy(), _unit(c[0] - c[1:].mean(axis=0)), atol=1e-12)

    centered = center(centroids(acts))
    proj = project(centered, axis)
    cos = cosine_to_reference(centered, "helpful_assistant")
    norms = centered.values.norm(dim=-1)
    np.testing.assert_allclose(proj.values.numpy() / norms.numpy(), cos.values.numpy(), atol=1e-12)

    # Another centering set: the axis is ref − mean(that set).
    other, y = _acts(seed=3)
    axis2 = assistant_axis(acts, centering=other)
    np.testing.assert_allclose(axis2.values.numpy(), _unit(c[0] - y.mean(axis=1).mean(axis=0)), atol=1e-12)
    axis3 = assistant_axis(acts, centering=["librarian", "medical_doctor"])
    np.testing.assert_allclose(axis3.values.numpy(), _unit(c[0] - c[[4, 5]].mean(axis=0)), atol=1e-12)


def test_project_per_prompt_and_per_centroid_match_numpy():
    acts, x = _acts()
    c = x.mean(axis=1)
    d = mean_difference(acts, "medical_doctor")
    dv = d.values.numpy()
    p = project(acts, d)
    np.testing.assert_allclose(p.values.numpy(), np.einsum("pqld,ld->pql", x, dv), atol=1e-12)
    assert p.per_prompt and p.values.shape == (6, 5, 3)
    assert p.at(2)["medical_doctor"] == pytest.approx(np.einsum("pqd,d->pq", x[:, :, 1], dv[1]).mean(axis=1)[5])
    frame = p.to_frame()
    assert len(frame) == 6 * 5 * 3 and {"persona", "question_index", "layer", "projection"} <= set(frame.columns)

    # Centered on every persona (what `center` does by default), at one layer.
    pc = project(acts, d, centering="all", layers=[2])
    expected = np.einsum("pqd,d->pq", x[:, :, 1] - c[:, 1].mean(axis=0), dv[1])[..., None]
    np.testing.assert_allclose(pc.values.numpy(), expected, atol=1e-12)
    assert pc.centered_on == tuple(acts.personas.names)

    # Centroids, centered on a named subset, a fitted Centering, and another set.
    cents = centroids(acts)
    sub = project(cents, d, centering=["qwen_default", "librarian"])
    np.testing.assert_allclose(sub.values.numpy(), np.einsum("pld,ld->pl", c - c[[1, 4]].mean(axis=0), dv), atol=1e-12)
    fitted = project(cents, d, centering=Centering().fit(cents, ["qwen_default", "librarian"]))
    np.testing.assert_allclose(fitted.values.numpy(), sub.values.numpy(), atol=1e-12)
    other, y = _acts(seed=2)
    oth = project(cents, d, centering=other)
    np.testing.assert_allclose(oth.values.numpy(), np.einsum("pld,ld->pl", c - y.mean(axis=1).mean(axis=0), dv), atol=1e-12)
    assert not oth.per_prompt and oth.to_wide().shape == (6, 3)
    assert "Projection onto" in oth.summary()

    # Direction.project on a raw tensor.
    t = torch.tensor(x)
    np.testing.assert_allclose(d.project(t).numpy(), p.values.numpy(), atol=1e-12)


def test_project_uses_the_layers_both_hold():
    acts, x = _acts()
    d = mean_difference(acts, "medical_doctor", layers=[2, 5])
    p = project(acts, d)
    assert p.layers == (2, 5)
    np.testing.assert_allclose(p.values.numpy(), np.einsum("pqld,ld->pql", x[:, :, [1, 2]], d.values.numpy()), atol=1e-12)


def test_direction_roundtrips_through_disk_and_dict(tmp_path):
    acts, _ = _acts()
    d = assistant_axis(acts, layers=[0, 5])
    path = d.save(tmp_path / "axis")
    assert (path / "direction.safetensors").is_file() and (path / "direction.json").is_file()
    back = Direction.load(path)
    assert torch.equal(back.values, d.values) and torch.equal(back.norms, d.norms)
    assert (back.layers, back.description, back.hook, back.positive, back.negative, back.model_id) == (
        d.layers, d.description, d.hook, d.positive, d.negative, d.model_id,
    )
    meta = json.loads((path / "direction.json").read_text())
    assert meta["d_model"] == 16 and "torch" in meta["package_versions"]
    as_dict = json.loads(json.dumps(d.to_dict()))
    np.testing.assert_allclose(np.array(as_dict["values"]), d.values.numpy())
    assert len(d.to_frame()) == 2 and "assistant axis" in d.summary()
    np.testing.assert_allclose(d.cosine(d).numpy(), [1.0, 1.0])
    with pytest.raises(ValueError, match="'path' parameter of Direction.load"):
        Direction.load(tmp_path / "nothing")


def test_bad_input_names_the_parameter():
    acts, _ = _acts()
    narrow, _ = _acts(D=8)
    d8 = mean_difference(narrow, "medical_doctor")
    with pytest.raises(ValueError, match=r"'direction' parameter of project must be a direction of the activations' width d_model=16.*d_model=8"):
        project(acts, d8)
    d = mean_difference(acts, "medical_doctor")
    with pytest.raises(ValueError, match=r"'layers' parameter of project must be layers held by both.*Got 99"):
        project(acts, d, layers=[99])
    with pytest.raises(ValueError, match="'layers' parameter of mean_difference"):
        mean_difference(acts, "medical_doctor", layers=[1])
    with pytest.raises(ValueError, match="'positive' parameter of mean_difference must be a non-empty list"):
        mean_difference(acts, [])
    with pytest.raises(ValueError, match="'negative' parameter of mean_difference must be a non-empty list"):
        mean_difference(acts, "medical_doctor", [])
    with pytest.raises(ValueError, match="'negative' parameter of mean_difference must be a non-empty group"):
        mean_difference(acts, acts.personas.names)
    with pytest.raises(ValueError, match="'positive' parameter of mean_difference must be one of the persona names"):
        mean_difference(acts, "nobody")
    with pytest.raises(ValueError, match="'negative' parameter of mean_difference must be persona names not also in 'positive'"):
        mean_difference(acts, ["medical_doctor", "data_scientist"], ["data_scientist"])
    with pytest.raises(ValueError, match="'reference' parameter of assistant_axis"):
        assistant_axis(acts, reference="nobody")
    with pytest.raises(ValueError, match="'centering' parameter of project"):
        project(acts, d, centering=["nobody"])
    with pytest.raises(ValueError, match="'layer' parameter of Direction.at"):
        d.at(3)
    with pytest.raises(TypeError, match="parameter 'x'|'x' parameter of project"):
        project(torch.zeros(3, 16), d)
    mismatched = mean_difference(acts, "medical_doctor", layers=[0])
    with pytest.raises(ValueError, match="'direction' parameter of project must be a direction with at least one"):
        project(acts.select(layers=[5]), mismatched)
