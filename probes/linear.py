"""Linear probes per layer: can a persona's identity, category or a variable be read off linearly?

``LinearProbe`` is a scikit-learn estimator that fits one model per layer
(``fit``/``predict``/``score``). ``probe_layers`` cross-validates it on an ``ActivationSet`` with
folds grouped by question, so that a question's prompts never sit in both the training and the
test side of a fold (otherwise the probe could recognise the question's tokens instead of the
persona), and compares every layer with a shuffled-label baseline run through the same folds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from sklearn.base import BaseEstimator
from torch import Tensor

from persona_geometry._serialization import ConfigDict
from persona_geometry._validation import (
    check_one_of,
    check_positive_int,
    check_probability,
    invalid,
)
from persona_geometry.activations import ActivationSet

__all__ = ["ProbeConfig", "LinearProbe", "ProbeResult", "probe_layers", "question_splits"]

log = logging.getLogger(__name__)

_KINDS = ("logistic", "ridge")


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(ConfigDict):
    """How ``probe_layers`` cross-validates.

    Attributes:
        cv: ``"group_kfold"`` (``n_splits`` folds of whole groups) or ``"leave_one_group_out"``.
        n_splits: Folds for ``group_kfold``; capped at the number of groups.
        group_by: ``"question"`` (default: held-out questions, every persona seen in training) or
            ``"persona"`` (held-out personas; not possible for persona identity).
        C: Inverse L2 strength of the logistic regression.
        ridge_penalty: L2 penalty of the ridge regression (scikit-learn's ``Ridge(alpha=)``).
        standardize: Scale every feature to unit variance on the training side first.
        n_shuffles: How many shuffled-label runs make the baseline.
        confidence: Level of the confidence intervals.
        max_iter: Iteration cap of the logistic solver.
        seed: Seed of the label shuffles (and of anything random in the solvers).
    """

    cv: str = "group_kfold"
    n_splits: int = 5
    group_by: str = "question"
    C: float | int = 1.0
    ridge_penalty: float | int = 1.0
    standardize: bool = True
    n_shuffles: int = 3
    confidence: float = 0.95
    max_iter: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        check_one_of(self.cv, "cv", "ProbeConfig", ("group_kfold", "leave_one_group_out"))
        check_one_of(self.group_by, "group_by", "ProbeConfig", ("question", "persona"))
        if check_positive_int(self.n_splits, "n_splits", "ProbeConfig") < 2:
            invalid("n_splits", "ProbeConfig", "an int ≥ 2", self.n_splits)
        for name in ("C", "ridge_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                invalid(name, "ProbeConfig", "a positive float", value)
        if (
            isinstance(self.n_shuffles, bool)
            or not isinstance(self.n_shuffles, int)
            or self.n_shuffles < 0
        ):
            invalid("n_shuffles", "ProbeConfig", "an int ≥ 0", self.n_shuffles)
        check_probability(self.confidence, "confidence", "ProbeConfig")
        check_positive_int(self.max_iter, "max_iter", "ProbeConfig")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            invalid("seed", "ProbeConfig", "an int", self.seed, exc=TypeError)


class LinearProbe(BaseEstimator):
    """One linear model per layer, a scikit-learn estimator.

    ``fit(X, y)`` with ``X`` shaped ``[sample, layer, d_model]`` fits an independent model on
    every layer; ``predict`` returns ``[sample, layer]``; ``score`` returns one accuracy
    (``kind="logistic"``) or R² (``kind="ridge"``) per layer. Parameters are only stored by
    the constructor and checked in ``fit``, so ``sklearn.base.clone`` and ``GridSearchCV``
    work; since ``score`` gives one number per layer, pass ``GridSearchCV`` a ``scoring`` that
    picks or averages layers (e.g. ``lambda est, X, y: est.score(X, y).mean()``).

    Args:
        kind: ``"logistic"`` (multinomial logistic regression) or ``"ridge"``.
        C: Inverse L2 strength (logistic).
        ridge_penalty: L2 penalty (ridge; scikit-learn's ``Ridge(alpha=)``).
        standardize: Scale features to unit variance (fitted on the training data).
        max_iter: Solver iteration cap (logistic).

    Attributes (after ``fit``):
        estimators_: One fitted scikit-learn pipeline per layer.
        classes_: The class labels (logistic only).
        n_layers_: The number of layers fitted.
        n_features_in_: ``d_model``.
    """

    def __init__(
        self,
        kind: str = "logistic",
        *,
        C: float | int = 1.0,
        ridge_penalty: float | int = 1.0,
        standardize: bool = True,
        max_iter: int = 2000,
    ):
        self.kind = kind
        self.C = C
        self.ridge_penalty = ridge_penalty
        self.standardize = standardize
        self.max_iter = max_iter

    def _check_params(self, func: str) -> None:
        check_one_of(self.kind, "kind", func, _KINDS)
        for name in ("C", "ridge_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                invalid(name, func, "a positive float", value)
        check_positive_int(self.max_iter, "max_iter", func)

    def _make_estimator(self) -> Any:
        """Returns the unfitted scikit-learn pipeline fitted at each layer."""
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = (
            LogisticRegression(C=self.C, max_iter=self.max_iter)
            if self.kind == "logistic"
            else Ridge(alpha=self.ridge_penalty)
        )
        return make_pipeline(StandardScaler(), model) if self.standardize else make_pipeline(model)

    def fit(
        self,
        X: Float[np.ndarray, "sample layer d_model"] | Float[Tensor, "sample layer d_model"],
        y: Sequence[Any] | np.ndarray,
    ) -> LinearProbe:
        """Fits one model per layer and returns ``self``."""
        self._check_params("LinearProbe.fit")
        X = _as_numpy(X, "LinearProbe.fit")
        y = _check_y(y, X.shape[0], self.kind, "LinearProbe.fit")
        self.estimators_ = [self._make_estimator().fit(X[:, j], y) for j in range(X.shape[1])]
        self.n_layers_ = X.shape[1]
        self.n_features_in_ = X.shape[2]
        if self.kind == "logistic":
            self.classes_ = self.estimators_[0].classes_
        return self

    def _check_fitted(self, X: np.ndarray, func: str) -> None:
        if not hasattr(self, "estimators_"):
            raise RuntimeError(
                f"This LinearProbe instance is not fitted yet. Call 'fit' before '{func}'."
            )
        if X.shape[1:] != (self.n_layers_, self.n_features_in_):
            invalid(
                "X",
                f"LinearProbe.{func}",
                f"shaped [sample, layer={self.n_layers_}, d_model={self.n_features_in_}]",
                tuple(X.shape),
            )

    def predict(
        self, X: Float[np.ndarray, "sample layer d_model"] | Float[Tensor, "sample layer d_model"]
    ) -> np.ndarray:
        """Returns the predictions ``[sample, layer]``."""
        X = _as_numpy(X, "LinearProbe.predict")
        self._check_fitted(X, "predict")
        return np.stack([est.predict(X[:, j]) for j, est in enumerate(self.estimators_)], axis=1)

    def score(
        self,
        X: Float[np.ndarray, "sample layer d_model"] | Float[Tensor, "sample layer d_model"],
        y: Sequence[Any] | np.ndarray,
    ) -> Float[np.ndarray, " layer"]:
        """Returns the accuracy (logistic) or R² (ridge) at every layer."""
        X = _as_numpy(X, "LinearProbe.score")
        self._check_fitted(X, "score")
        y = _check_y(y, X.shape[0], self.kind, "LinearProbe.score")
        return np.array(
            [est.score(X[:, j], y) for j, est in enumerate(self.estimators_)], dtype=np.float64
        )


def _as_numpy(X: Any, func: str) -> np.ndarray:
    if isinstance(X, Tensor):
        X = (
            X.detach()
            .to("cpu", torch.float64 if X.dtype == torch.float64 else torch.float32)
            .numpy()
        )
    X = np.asarray(X)
    if X.ndim != 3:
        invalid("X", func, "an array shaped [sample, layer, d_model]", tuple(X.shape))
    return X


def _check_y(y: Any, n: int, kind: str, func: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        invalid("y", func, f"one label per sample, shaped [{n}]", tuple(y.shape))
    if kind == "ridge":
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y.astype(np.float64))):
            invalid("y", func, "finite numbers for kind='ridge'", y.dtype)
        return y.astype(np.float64)
    if len(np.unique(y)) < 2:
        invalid(
            "y", func, "labels with at least two classes for kind='logistic'", np.unique(y).tolist()
        )
    return y


# --- grouped cross-validation ---------------------------------------------------------------


def question_splits(
    n_personas: int,
    n_questions: int,
    *,
    n_splits: int = 5,
    cv: str = "group_kfold",
    group_by: str = "question",
) -> Iterator[tuple[Int[np.ndarray, " train"], Int[np.ndarray, " test"]]]:
    """Yields ``(train, test)`` sample indices whose groups (questions, or personas) never overlap.

    Samples are ordered persona-major, as ``ActivationSet`` stores them: prompt ``(p, q)`` is
    sample ``p * n_questions + q``.

    Args:
        n_personas: Personas in the set.
        n_questions: Questions in the set.
        n_splits: Folds for ``group_kfold`` (capped at the number of groups).
        cv: ``"group_kfold"`` or ``"leave_one_group_out"``.
        group_by: ``"question"`` or ``"persona"``.

    Raises:
        ValueError: If there are fewer than two groups to split.
    """
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    func = "question_splits"
    check_one_of(cv, "cv", func, ("group_kfold", "leave_one_group_out"))
    check_one_of(group_by, "group_by", func, ("question", "persona"))
    groups = _groups(n_personas, n_questions, group_by)
    n_groups = n_questions if group_by == "question" else n_personas
    if n_groups < 2:
        invalid(
            "group_by",
            func,
            f"a grouping with at least two groups (there is {n_groups} {group_by})",
            group_by,
        )
    if cv == "leave_one_group_out":
        splitter: Any = LeaveOneGroupOut()
    else:
        splitter = GroupKFold(
            n_splits=min(check_positive_int(n_splits, "n_splits", func), n_groups)
        )
    dummy = np.zeros((len(groups), 1))
    yield from splitter.split(dummy, groups=groups)


def _groups(n_personas: int, n_questions: int, group_by: str) -> np.ndarray:
    p, q = np.meshgrid(np.arange(n_personas), np.arange(n_questions), indexing="ij")
    return (q if group_by == "question" else p).reshape(-1)


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ProbeResult:
    """Cross-validated probe scores per layer, with confidence intervals and a shuffled baseline.

    Attributes:
        kind: ``"logistic"`` or ``"ridge"``.
        metric: ``"accuracy"`` or ``"r2"``.
        target: What was predicted, e.g. ``"persona"``.
        layers: Block indices.
        score: ``[layer]``, the point estimate: out-of-fold accuracy over every prompt (each
            prompt is predicted once, by the fold that held it out), or the mean R² over folds.
        ci_low: ``[layer]``, lower confidence bound: Wilson interval of the pooled accuracy
            (treats prompts as independent), or a t interval across folds for R².
        ci_high: ``[layer]``, upper bound.
        fold_scores: ``[layer, fold]``, the score on each fold's held-out prompts.
        baseline: ``[layer, shuffle]``, the same cross-validation with labels shuffled across
            personas within each question.
        chance: The majority-class rate (logistic) or 0 (R² of predicting the mean).
        folds: Held-out group indices (questions or personas) of each fold.
        group_by: ``"question"`` or ``"persona"``.
        n_samples: Prompts used.
        n_classes: Classes (logistic) or None.
        confidence: Level of the intervals.
        config: The ``ProbeConfig`` as a dict.
    """

    kind: str
    metric: str
    target: str
    layers: tuple[int, ...]
    score: Float[np.ndarray, " layer"]
    ci_low: Float[np.ndarray, " layer"]
    ci_high: Float[np.ndarray, " layer"]
    fold_scores: Float[np.ndarray, "layer fold"]
    baseline: Float[np.ndarray, "layer shuffle"]
    chance: float
    folds: tuple[tuple[int, ...], ...]
    group_by: str
    n_samples: int
    n_classes: int | None
    confidence: float
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def best_layer(self) -> int:
        """The layer with the highest cross-validated score (the first one on ties)."""
        return self.layers[int(np.argmax(self.score))]

    @property
    def best_score(self) -> float:
        """The score at ``best_layer``."""
        return float(np.max(self.score))

    def at(self, layer: int) -> dict[str, float]:
        """Returns score, CI bounds and baseline mean at block ``layer``."""
        if layer not in self.layers:
            invalid("layer", "ProbeResult.at", f"one of the layers {list(self.layers)}", layer)
        j = self.layers.index(layer)
        return {
            "score": float(self.score[j]),
            "ci_low": float(self.ci_low[j]),
            "ci_high": float(self.ci_high[j]),
            "baseline": float(self.baseline[j].mean()) if self.baseline.shape[1] else float("nan"),
        }

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per layer: score, CI, fold mean/sd, shuffled baseline, chance."""
        has_base = self.baseline.shape[1] > 0
        return pd.DataFrame(
            {
                "layer": list(self.layers),
                self.metric: self.score,
                "ci_low": self.ci_low,
                "ci_high": self.ci_high,
                "fold_mean": self.fold_scores.mean(axis=1),
                "fold_sd": self.fold_scores.std(axis=1, ddof=1)
                if self.fold_scores.shape[1] > 1
                else np.nan,
                "baseline_mean": self.baseline.mean(axis=1) if has_base else np.nan,
                "baseline_max": self.baseline.max(axis=1) if has_base else np.nan,
                "chance": self.chance,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict of every field, plus the best layer."""
        return {
            "kind": self.kind,
            "metric": self.metric,
            "target": self.target,
            "layers": list(self.layers),
            "score": self.score.tolist(),
            "ci_low": self.ci_low.tolist(),
            "ci_high": self.ci_high.tolist(),
            "fold_scores": self.fold_scores.tolist(),
            "baseline": self.baseline.tolist(),
            "chance": self.chance,
            "folds": [list(f) for f in self.folds],
            "group_by": self.group_by,
            "n_samples": self.n_samples,
            "n_classes": self.n_classes,
            "confidence": self.confidence,
            "best_layer": self.best_layer,
            "best_score": self.best_score,
            "config": dict(self.config),
        }

    def summary(self) -> str:
        """Returns a per-layer table with the best layer named, as text."""
        name = "accuracy" if self.metric == "accuracy" else "R²"
        head = (
            f"{self.kind} probe for {self.target}: cross-validated {name} per layer "
            f"({len(self.folds)} folds grouped by {self.group_by}, {self.n_samples} prompts"
            + (f", {self.n_classes} classes" if self.n_classes else "")
            + f"; {int(self.confidence * 100)}% CI)"
        )
        # The majority class, not 1/classes, is what a constant guess scores; the shuffled-label
        # runs (baseline_mean) are the baseline that accounts for the folds.
        floor = (
            f"majority-class rate {self.chance:.3f}"
            if self.metric == "accuracy"
            else "predicting the mean scores R² 0"
        )
        head += f"\n{floor}; shuffled-label baseline per layer in baseline_mean"
        n_shuffles = self.baseline.shape[1]
        if n_shuffles:
            fits = len(self.layers) * (1 + n_shuffles) * len(self.folds)
            head += (
                f", from {n_shuffles} shuffles, each a full cross-validation: {fits} probe fits "
                "in all (set ProbeConfig(n_shuffles=0) to skip them)"
            )
        floor_column = "majority_class_rate" if self.metric == "accuracy" else "mean_r2"
        frame = self.to_frame().rename(columns={"chance": floor_column})
        frame = frame.round(3).to_string(index=False)
        best = f"best layer: {self.best_layer} ({name} {self.best_score:.3f})"
        return "\n".join([head, frame, best])


# --- the cross-validated sweep --------------------------------------------------------------


def _target(acts: ActivationSet, target: Any, func: str) -> tuple[np.ndarray, str]:
    """Returns the labels ``[persona, question]`` and a description of the target."""
    P, Q = len(acts.personas), len(acts.questions)
    if isinstance(target, str):
        if target == "persona":
            labels = np.asarray(acts.personas.names, dtype=object)
        elif target == "category":
            labels = np.asarray(acts.personas.categories, dtype=object)
        else:
            invalid(
                "target",
                func,
                "'persona', 'category', a {persona: value} mapping, "
                "or values per persona or per prompt",
                target,
            )
        return np.repeat(labels[:, None], Q, axis=1), target
    if isinstance(target, Mapping):
        missing = [n for n in acts.personas.names if n not in target]
        if missing:
            invalid(
                "target",
                func,
                f"a mapping with a value for every persona of the activations (missing {missing})",
                sorted(target),
            )
        values = np.asarray([target[n] for n in acts.personas.names])
        return np.repeat(values[:, None], Q, axis=1), "per-persona variable"
    values = target.detach().cpu().numpy() if isinstance(target, Tensor) else np.asarray(target)
    if values.shape == (P,):
        return np.repeat(values[:, None], Q, axis=1), "per-persona variable"
    if values.shape == (P, Q):
        return values, "per-prompt variable"
    invalid(
        "target",
        func,
        f"values shaped [persona={P}] or [persona={P}, question={Q}]",
        tuple(values.shape),
    )


def _shuffle_within(
    y: np.ndarray, n_personas: int, n_questions: int, rng: np.random.Generator
) -> np.ndarray:
    # Within each question, permute the labels across personas: every fold keeps its label
    # mix, but a prompt's label no longer belongs to its persona.
    grid = y.reshape(n_personas, n_questions).copy()
    for q in range(n_questions):
        grid[:, q] = grid[rng.permutation(n_personas), q]
    return grid.reshape(-1)


def _cv_scores(
    X: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]], probe: LinearProbe
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the fold scores ``[fold]`` and the out-of-fold correct/prediction vector.

    The out-of-fold predictions come from ``cross_val_predict`` over the grouped splits (each
    prompt predicted once, by the fold that held it out); the fold scores are read off them.
    """
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import cross_val_predict

    pred = cross_val_predict(probe._make_estimator(), X, y, cv=splits)
    if probe.kind == "logistic":
        oof = (pred == y).astype(np.float64)
        scores = np.array([accuracy_score(y[test], pred[test]) for _, test in splits])
        return scores, oof
    # R² of a fold whose held-out values are all equal is undefined (scikit-learn says 1 or 0).
    scores = np.array(
        [r2_score(y[test], pred[test]) if np.ptp(y[test]) > 0 else math.nan for _, test in splits]
    )
    return scores, pred.astype(np.float64)


def _wilson(k: float | int, n: int, confidence: float) -> tuple[float, float]:
    """Returns the Wilson score interval of ``k / n`` at level ``confidence``."""
    from persona_geometry.stats import wilson_bounds

    return wilson_bounds(int(round(k)), int(n), alpha=1 - confidence)


def _t_interval(x: np.ndarray, confidence: float) -> tuple[float, float]:
    from scipy.stats import t

    x = x[np.isfinite(x)]
    if len(x) < 2:
        return float("nan"), float("nan")
    half = t.ppf(0.5 + confidence / 2, df=len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def probe_layers(
    acts: ActivationSet,
    target: str | Mapping[str, Any] | Sequence[Any] | np.ndarray | Tensor = "persona",
    *,
    kind: str | None = None,
    hook: str = "resid_post",
    layers: int | Sequence[int] | None = None,
    config: ProbeConfig | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Returns per-layer cross-validated probe scores, CIs, a shuffled baseline, the best layer.

    Every prompt's last-token activation at a layer is one sample. Folds hold out whole
    questions (or whole personas with ``config.group_by="persona"``), so no question sits on
    both sides of a fold.

    Args:
        acts: The activations.
        target: ``"persona"`` (identity), ``"category"``, a ``{persona: value}`` mapping or a
            sequence of one value per persona, or an array ``[persona, question]`` of per-prompt
            values.
        kind: ``"logistic"`` or ``"ridge"``; by default ridge for numeric targets, logistic
            otherwise.
        hook: Which hook point to probe.
        layers: Blocks to probe (all stored ones by default).
        config: Cross-validation settings (``ProbeConfig()`` by default).
        progress: Show a progress bar over layers.

    Raises:
        ValueError: If the target does not fit the activations, a layer is not stored, there
            are fewer than two groups or classes, or persona identity is probed with folds
            grouped by persona.
    """
    from tqdm.auto import tqdm

    func = "probe_layers"
    config = config or ProbeConfig()
    if not isinstance(acts, ActivationSet):
        invalid("acts", func, "an ActivationSet", type(acts).__name__, exc=TypeError)
    if hook not in acts.hooks:
        invalid("hook", func, f"one of the stored hooks {acts.hooks}", hook)
    grid, description = _target(acts, target, func)
    numeric = np.issubdtype(grid.dtype, np.number) and grid.dtype != np.bool_
    kind = kind if kind is not None else ("ridge" if numeric else "logistic")
    check_one_of(kind, "kind", func, _KINDS)
    if kind == "ridge" and not numeric:
        invalid("target", func, "numeric values for kind='ridge'", description)
    if isinstance(target, str) and target == "persona" and config.group_by == "persona":
        invalid(
            "config",
            func,
            "group_by='question' for persona identity "
            "(a held-out persona's name can't be predicted)",
            "group_by='persona'",
        )

    if layers is None:
        lidx = list(range(len(acts.layers)))
    else:
        layers = [layers] if isinstance(layers, int) else list(layers)
        if not layers:
            invalid("layers", func, f"a non-empty list of layers from {list(acts.layers)}", layers)
        lidx = [acts.layer_position(layer, func=func) for layer in layers]
    P, Q = len(acts.personas), len(acts.questions)
    y = grid.reshape(-1)
    if kind == "ridge":
        y = y.astype(np.float64)
    probe = LinearProbe(
        kind,
        C=config.C,
        ridge_penalty=config.ridge_penalty,
        standardize=config.standardize,
        max_iter=config.max_iter,
    )
    _check_y(y, len(y), kind, func)
    splits = list(
        question_splits(P, Q, n_splits=config.n_splits, cv=config.cv, group_by=config.group_by)
    )
    groups = _groups(P, Q, config.group_by)
    folds = tuple(tuple(int(g) for g in np.unique(groups[test])) for _, test in splits)
    rng = np.random.default_rng(config.seed)
    shuffled = [_shuffle_within(y, P, Q, rng) for _ in range(config.n_shuffles)]

    x = acts[hook]
    n_layers = len(lidx)
    score = np.empty(n_layers)
    lo = np.empty(n_layers)
    hi = np.empty(n_layers)
    fold_scores = np.empty((n_layers, len(splits)))
    baseline = np.empty((n_layers, config.n_shuffles))
    # Each layer is cross-validated once on the labels and once per shuffle: that is the cost.
    n_fits = len(lidx) * (1 + config.n_shuffles) * len(splits)
    log.info(
        "probe %s: %d layers × (1 + %d shuffles) × %d folds = %d fits",
        description, len(lidx), config.n_shuffles, len(splits), n_fits,
    )  # fmt: skip
    desc = f"probing {description} ({(1 + config.n_shuffles) * len(splits)} fits per layer)"
    for j, li in enumerate(tqdm(lidx, desc=desc, disable=not progress, leave=False)):
        X = x[:, :, li].reshape(P * Q, -1)
        X = (
            X.detach()
            .to("cpu", torch.float64 if X.dtype == torch.float64 else torch.float32)
            .numpy()
        )
        fold_scores[j], oof = _cv_scores(X, y, splits, probe)
        if kind == "logistic":
            score[j] = oof.mean()
            lo[j], hi[j] = _wilson(oof.sum(), len(oof), config.confidence)
        else:
            score[j] = fold_scores[j].mean()
            lo[j], hi[j] = _t_interval(fold_scores[j], config.confidence)
        for s, ys in enumerate(shuffled):
            if kind == "logistic":
                baseline[j, s] = _cv_scores(X, ys, splits, probe)[1].mean()
            else:
                baseline[j, s] = _cv_scores(X, ys, splits, probe)[0].mean()
    if kind == "logistic":
        _, counts = np.unique(y, return_counts=True)
        chance, n_classes = float(counts.max() / counts.sum()), len(counts)
    else:
        chance, n_classes = 0.0, None
    result = ProbeResult(
        kind=kind,
        metric="accuracy" if kind == "logistic" else "r2",
        target=description,
        layers=tuple(acts.layers[i] for i in lidx),
        score=score,
        ci_low=lo,
        ci_high=hi,
        fold_scores=fold_scores,
        baseline=baseline,
        chance=chance,
        folds=folds,
        group_by=config.group_by,
        n_samples=P * Q,
        n_classes=n_classes,
        confidence=config.confidence,
        config=config.to_dict(),
    )
    log.info(
        "probe %s: best layer %d (%s %.3f)",
        description,
        result.best_layer,
        result.metric,
        result.best_score,
    )
    return result
