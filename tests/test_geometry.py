"""Centroids, centering and cosines against a numpy computation written here."""

import numpy as np
import pytest
import torch

from persona_geometry.activations import ActivationSet
from persona_geometry.geometry import (
    Centering,
    center,
    centroids,
    cosine_to_reference,
    pairwise_cosine,
)
from persona_geometry.personas import builtin_personas


def _acts(seed=0, P=5, Q=4, L=3, D=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(P, Q, L, D)) + rng.normal(size=(1, 1, L, D)) * 3  # a shared offset, as in real models
    ps = builtin_personas()[:P]
    acts = ActivationSet(
        {"resid_post": torch.tensor(x, dtype=torch.float64)},
        personas=ps,
        questions=[f"q{i}?" for i in range(Q)],
        layers=[0, 2, 5],
        n_tokens=torch.full((P, Q), 7),
    )
    return acts, x


def _np_cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_centroids_center_and_cosine_match_numpy():
    acts, x = _acts()
    c = x.mean(axis=1)  # [P, L, D]
    centered = c - c.mean(axis=0, keepdims=True)
    expected = _np_cos(centered, centered[0][None])  # reference = first persona

    cents = centroids(acts)
    np.testing.assert_allclose(cents.values.numpy(), c, rtol=0, atol=1e-12)
    cos = cosine_to_reference(center(cents), reference="helpful_assistant")
    np.testing.assert_allclose(cos.values.numpy(), expected, atol=1e-12)
    assert cos.values[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    frame = cos.to_frame()
    assert len(frame) == 5 * 3 and set(frame.columns) == {"persona", "category", "layer", "cosine"}
    assert cos.at(5)["librarian"] == pytest.approx(expected[4, 2])


def test_centering_on_a_subset_and_on_another_set():
    acts, x = _acts()
    c = x.mean(axis=1)
    sub = ["qwen_default", "librarian"]
    got = center(centroids(acts), sub).values.numpy()
    np.testing.assert_allclose(got, c - c[[1, 4]].mean(axis=0), atol=1e-12)

    other_acts, y = _acts(seed=1)
    got = center(centroids(acts), centroids(other_acts)).values.numpy()
    np.testing.assert_allclose(got, c - y.mean(axis=1).mean(axis=0), atol=1e-12)
    fitted = Centering().fit(centroids(other_acts))
    assert fitted.personas_ == tuple(other_acts.personas.names)
    assert fitted.mean_.shape == (3, 16)


def test_pairwise_cosine_matches_numpy():
    acts, x = _acts()
    c = x.mean(axis=1)
    centered = c - c.mean(axis=0, keepdims=True)
    pw = pairwise_cosine(center(centroids(acts)))
    for k in range(3):
        u = centered[:, k] / np.linalg.norm(centered[:, k], axis=-1, keepdims=True)
        np.testing.assert_allclose(pw.values[k].numpy(), u @ u.T, atol=1e-12)
    u = centered[:, 1] / np.linalg.norm(centered[:, 1], axis=-1, keepdims=True)
    assert pw.at(2).loc["qwen_default", "librarian"] == pytest.approx((u @ u.T)[1, 4])
    assert len(pw.to_frame()) == 3 * 5 * 5


def test_unknown_reference_and_bad_centering_are_clear_errors():
    acts, _ = _acts()
    with pytest.raises(ValueError, match="'reference' parameter of cosine_to_reference must be one of the persona names"):
        cosine_to_reference(center(centroids(acts)), reference="nobody")
    with pytest.raises(ValueError, match="'personas' parameter of Centering.fit"):
        center(centroids(acts), ["nobody"])
    with pytest.raises(ValueError, match="'personas' parameter of Centering.fit must be a non-empty"):
        center(centroids(acts), [])
    with pytest.raises(ValueError, match="'layer' parameter of ActivationSet.select"):
        acts.select(layers=[3])
    with pytest.raises(ValueError, match="'hook' parameter of ActivationSet.__getitem__"):
        acts["attn_out"]


def test_select_keeps_labels_aligned():
    acts, x = _acts()
    sub = acts.select(personas=["librarian", "qwen_default"], layers=[5], questions=[1, 3])
    np.testing.assert_array_equal(sub["resid_post"].numpy(), x[[4, 1]][:, [1, 3]][:, :, [2]])
    assert sub.personas.names == ["librarian", "qwen_default"] and sub.layers == (5,)
