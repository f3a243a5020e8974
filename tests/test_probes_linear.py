"""Per-layer linear probes: planted signal found, shuffled labels at chance, folds never leak a question."""

import numpy as np
import pytest
import torch

from persona_geometry.activations import ActivationSet
from persona_geometry.personas import Persona, PersonaSet
from persona_geometry.probes import LinearProbe, ProbeConfig, probe_layers, question_splits

P, Q, D = 6, 12, 24


def _personas():
    cats = ["a", "a", "b", "b", "c", "c"]
    return PersonaSet(Persona(name=f"p{i}", system_prompt=f"You are p{i}.", category=cats[i]) for i in range(P))


def _planted(seed=0, strength=6.0):
    """Layer 1 carries a persona-specific offset; layers 0 and 2 carry only question offsets and noise."""
    rng = np.random.default_rng(seed)
    question_offset = rng.normal(size=(1, Q, 1, D))  # same for every persona: no persona signal
    x = rng.normal(size=(P, Q, 3, D)) + question_offset
    persona_means = rng.normal(size=(P, D))
    persona_means /= np.linalg.norm(persona_means, axis=-1, keepdims=True)
    x[:, :, 1] += strength * persona_means[:, None, :]
    acts = ActivationSet(
        {"resid_post": torch.tensor(x, dtype=torch.float32)},
        personas=_personas(),
        questions=[f"q{i}?" for i in range(Q)],
        layers=[3, 7, 11],
        n_tokens=torch.full((P, Q), 9),
    )
    return acts, x, persona_means


def test_planted_persona_direction_is_found_and_shuffles_sit_at_chance():
    acts, _, _ = _planted()
    res = probe_layers(acts, "persona", config=ProbeConfig(n_splits=4, n_shuffles=3), progress=False)
    assert res.kind == "logistic" and res.metric == "accuracy" and res.n_classes == P
    assert res.chance == pytest.approx(1 / P)
    acc = dict(zip(res.layers, res.score, strict=True))
    assert acc[7] >= 0.95
    assert acc[3] < 0.4 and acc[11] < 0.4  # chance is 1/6
    assert res.best_layer == 7
    # Shuffled labels within each question: chance everywhere, the planted layer included.
    assert np.all(res.baseline.mean(axis=1) < 0.35)
    assert res.ci_low[1] > res.baseline[1].max()
    assert np.all(res.ci_low <= res.score) and np.all(res.score <= res.ci_high)
    frame = res.to_frame()
    assert list(frame["layer"]) == [3, 7, 11] and {"accuracy", "ci_low", "baseline_mean", "chance"} <= set(frame.columns)
    assert "best layer: 7" in res.summary()
    assert res.to_dict()["best_layer"] == 7
    # The majority baseline is named for what it is, and the summary says what the shuffles cost.
    assert f"majority-class rate {1 / P:.3f}" in res.summary() and "chance" not in res.summary().splitlines()[0]
    assert f"{3 * (1 + 3) * 4} probe fits in all" in res.summary()


def test_accuracy_ci_is_the_wilson_interval_of_pooled_predictions():
    from statsmodels.stats.proportion import proportion_confint

    acts, _, _ = _planted(seed=1, strength=1.0)
    res = probe_layers(acts, "category", layers=[7], config=ProbeConfig(n_splits=3, n_shuffles=0), progress=False)
    k = round(res.score[0] * P * Q)
    lo, hi = proportion_confint(k, P * Q, alpha=0.05, method="wilson")
    assert res.ci_low[0] == pytest.approx(lo) and res.ci_high[0] == pytest.approx(hi)
    # Every prompt is predicted exactly once: the pooled accuracy is the size-weighted fold mean.
    sizes = np.array([len(f) for f in res.folds]) * P
    assert res.score[0] == pytest.approx((res.fold_scores[0] * sizes).sum() / sizes.sum())
    assert res.chance == pytest.approx(1 / 3) and res.baseline.shape == (1, 0)


@pytest.mark.parametrize("cv", ["group_kfold", "leave_one_group_out"])
@pytest.mark.parametrize("group_by", ["question", "persona"])
def test_grouped_folds_never_leak_a_group(cv, group_by):
    splits = list(question_splits(P, Q, n_splits=5, cv=cv, group_by=group_by))
    question = np.tile(np.arange(Q), P)  # persona-major order: sample p*Q + q
    persona = np.repeat(np.arange(P), Q)
    g = question if group_by == "question" else persona
    tested = np.concatenate([test for _, test in splits])
    assert sorted(tested.tolist()) == list(range(P * Q))  # each sample tested once
    for train, test in splits:
        assert not set(g[train]) & set(g[test])
    assert len(splits) == (min(5, len(set(g))) if cv == "group_kfold" else len(set(g)))


def test_grouping_matters_a_question_only_signal_does_not_transfer_to_new_questions():
    # Every prompt's target is its question's random value, and the activations carry the
    # question's identity. Ungrouped folds would let the probe recall seen questions; folds
    # grouped by question must not.
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold, cross_val_score

    rng = np.random.default_rng(5)
    qsig = rng.normal(size=(Q, D)) * 3
    x = rng.normal(size=(P, Q, 1, D)) * 0.3 + qsig[None, :, None, :]
    y = np.tile(rng.normal(size=Q), (P, 1))  # [persona, question]
    acts = ActivationSet(
        {"resid_post": torch.tensor(x, dtype=torch.float32)},
        personas=_personas(),
        questions=[f"q{i}?" for i in range(Q)],
        layers=[0],
        n_tokens=torch.full((P, Q), 9),
    )
    res = probe_layers(acts, y, config=ProbeConfig(n_splits=4, n_shuffles=0, ridge_penalty=1.0), progress=False)
    assert res.kind == "ridge" and res.target == "per-prompt variable"
    assert res.score[0] < 0.1
    for fold in res.folds:
        assert len(fold) == Q // 4
    assert sorted(q for fold in res.folds for q in fold) == list(range(Q))
    leaky = cross_val_score(Ridge(alpha=1.0), x.reshape(P * Q, D), y.reshape(-1), cv=KFold(4, shuffle=True, random_state=0))
    assert leaky.mean() > 0.9  # what the grouping protects against


def test_ridge_recovers_a_planted_per_persona_variable():
    acts, _, means = _planted(seed=2)
    w = np.random.default_rng(9).normal(size=D)
    value = {f"p{i}": float(means[i] @ w) for i in range(P)}
    res = probe_layers(acts, value, config=ProbeConfig(n_splits=4, n_shuffles=2, ridge_penalty=10.0), progress=False)
    assert res.metric == "r2" and res.best_layer == 7
    assert res.score[1] > 0.5 and res.score[0] < 0.2 and res.score[2] < 0.2
    assert np.all(res.baseline.mean(axis=1) < 0.3)
    # The R² CI is a t interval over folds.
    from scipy.stats import t

    f = res.fold_scores[1]
    half = t.ppf(0.975, len(f) - 1) * f.std(ddof=1) / np.sqrt(len(f))
    assert res.ci_low[1] == pytest.approx(f.mean() - half) and res.ci_high[1] == pytest.approx(f.mean() + half)


def test_linear_probe_matches_sklearn_fit_per_layer():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    acts, x, _ = _planted(seed=3)
    X = x.reshape(P * Q, 3, D).astype(np.float32)
    y = np.repeat(np.arange(P), Q)
    probe = LinearProbe("logistic", C=0.5).fit(torch.tensor(X), y)
    assert probe.n_layers_ == 3 and probe.n_features_in_ == D and list(probe.classes_) == list(range(P))
    for j in range(3):
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(X[:, j], y)
        np.testing.assert_array_equal(probe.predict(X)[:, j], ref.predict(X[:, j]))
        assert probe.score(X, y)[j] == pytest.approx(ref.score(X[:, j], y))
    with pytest.raises(RuntimeError, match="not fitted"):
        LinearProbe("ridge").predict(X)
    with pytest.raises(ValueError, match="'X' parameter of LinearProbe.predict"):
        probe.predict(X[:, :2])


def test_bad_input_names_the_parameter():
    acts, _, _ = _planted()
    with pytest.raises(ValueError, match=r"'target' parameter of probe_layers must be a mapping with a value for every persona.*missing \['p5'\]"):
        probe_layers(acts, {f"p{i}": 1.0 for i in range(5)}, progress=False)
    with pytest.raises(ValueError, match="'layer' parameter of probe_layers must be one of the stored layers"):
        probe_layers(acts, layers=[4], progress=False)
    with pytest.raises(ValueError, match="'config' parameter of probe_layers must be group_by='question' for persona identity"):
        probe_layers(acts, "persona", config=ProbeConfig(group_by="persona"), progress=False)
    with pytest.raises(ValueError, match="'target' parameter of probe_layers must be values shaped"):
        probe_layers(acts, np.zeros(4), progress=False)
    with pytest.raises(ValueError, match="'target' parameter of probe_layers must be numeric values for kind='ridge'"):
        probe_layers(acts, "category", kind="ridge", progress=False)
    with pytest.raises(ValueError, match="'n_splits' parameter of ProbeConfig"):
        ProbeConfig(n_splits=1)
    with pytest.raises(ValueError, match="'cv' parameter of ProbeConfig"):
        ProbeConfig(cv="kfold")
    with pytest.raises(ValueError, match="'y' parameter of probe_layers must be labels with at least two classes"):
        probe_layers(acts, {f"p{i}": "same" for i in range(P)}, progress=False)
    assert ProbeConfig.from_dict(ProbeConfig(C=2.0).to_dict()) == ProbeConfig(C=2.0)


def test_linear_probe_is_a_scikit_learn_estimator_that_clone_and_grid_search_accept():
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, GroupKFold

    acts, x, _ = _planted(seed=4)
    X = x.reshape(P * Q, 3, D)
    y = np.repeat(np.arange(P), Q)
    probe = LinearProbe("logistic", C=0.5, max_iter=500)
    assert probe.get_params() == {"kind": "logistic", "C": 0.5, "ridge_penalty": 1.0, "standardize": True, "max_iter": 500}
    copy = clone(probe.fit(X, y))
    assert copy.get_params() == probe.get_params() and not hasattr(copy, "estimators_")
    assert [a for a in vars(probe) if a not in probe.get_params()] and all(
        a.endswith("_") for a in vars(probe) if a not in probe.get_params()
    )  # learned attributes end in "_"
    assert repr(LinearProbe("ridge", ridge_penalty=2.0)) == "LinearProbe(kind='ridge', ridge_penalty=2.0)"

    # GridSearchCV over C with question-grouped folds; the scoring picks the planted layer.
    groups = np.tile(np.arange(Q), P)
    search = GridSearchCV(
        LinearProbe("logistic"), {"C": [0.01, 1.0]}, cv=GroupKFold(n_splits=3),
        scoring=lambda est, X_, y_: float(est.score(X_, y_)[1]),
    )  # fmt: skip
    search.fit(X, y, groups=groups)
    # The reference: the same grid scored by hand, one fold at a time.
    expected = {}
    for C in (0.01, 1.0):
        folds = [LinearProbe("logistic", C=C).fit(X[tr], y[tr]).score(X[te], y[te])[1]
                 for tr, te in GroupKFold(n_splits=3).split(X, y, groups)]  # fmt: skip
        expected[C] = np.mean(folds)
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], [expected[0.01], expected[1.0]], rtol=1e-12)
    assert search.best_params_["C"] == max(expected, key=expected.get)
    assert isinstance(search.best_estimator_, LinearProbe) and search.best_estimator_.n_layers_ == 3
    with pytest.raises(ValueError, match="'kind' parameter of LinearProbe.fit"):
        LinearProbe("lasso").fit(X, y)
