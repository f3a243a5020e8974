"""The layer sweep: per-layer correlation of a persona geometry measure with a behavioural rate.

For every layer, Pearson r and Spearman ρ of cosine vs rate with their p-values, corrected
across layers (Bonferroni, Holm), bootstrap confidence intervals over personas, the strongest
layer, and a permutation test of the max-over-layers statistic, which answers "is the best layer
real, or the best of many noisy layers?". A layer declared in advance (``primary_layer``) is
reported as the primary result whatever the sweep finds.

Everything is vectorised over layers: ranks are taken once, a correlation for every layer is
one matrix product, permutations are processed in chunks of matrix products, and bootstrap
resamples are evaluated as weighted correlations over the original personas (a resample is a
vector of draw counts), so no resample is ever materialised or sorted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from persona_geometry._validation import check_one_of, check_unique_names, invalid
from persona_geometry.geometry import CosineToReference
from persona_geometry.stats import (
    CHUNK_ELEMENTS,
    STATISTICS,
    TIE_TOL,
    PerPersona,
    bonferroni,
    correlate,
    holm,
    json_float,
    rank,
    rates_from,
    standardize,
)

__all__ = ["LayerSweep", "layer_sweep"]

log = logging.getLogger(__name__)

# The bootstrap streams several [chunk, layer, persona] temporaries; keeping each near 1 MB
# (cache-sized) measured twice as fast as 32 MB blocks on a 2-core EPYC.
_BOOT_CHUNK_ELEMENTS = 1 << 17


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerSweep:
    """Per-layer correlations of a geometry measure with a rate, and which layer is strongest.

    Attributes:
        layers: Block indices, in the order of every per-layer array.
        personas: The personas the statistics were computed over (after exclusions).
        statistic: ``"spearman"`` or ``"pearson"``: picks the strongest layer and is the
            statistic of the max-over-layers permutation test.
        pearson_r, pearson_p: Pearson's r per layer and its two-sided p-value.
        pearson_p_bonferroni, pearson_p_holm: The p-values corrected across layers.
        pearson_ci: ``[layer, 2]`` bootstrap percentile interval of r over personas.
        spearman_rho, spearman_p, spearman_p_bonferroni, spearman_p_holm, spearman_ci: The same
            for Spearman's ρ.
        p_maxt: Per-layer p-value adjusted by the permutation distribution of the maximum
            ``|statistic|`` over layers (single-step max-T; controls the family-wise error).
        best_layer: The layer with the largest ``|statistic|``.
        max_statistic: That largest ``|statistic|``.
        max_statistic_p: Permutation p-value of ``max_statistic``:
            ``(1 + #{max_perm >= max_obs}) / (1 + n_permutations)``; NaN if no permutations.
        n_permutations, n_bootstrap, confidence, seed: The settings used.
        primary_layer: The layer declared in advance, or None.
        reference: The reference persona's name, or None.
        excluded: Personas dropped before computing anything.
        without_reference: The same sweep without the reference persona, when the reference was
            among ``personas``; else None.
    """

    layers: tuple[int, ...]
    personas: tuple[str, ...]
    statistic: str
    pearson_r: Float[np.ndarray, " layer"]
    pearson_p: Float[np.ndarray, " layer"]
    pearson_p_bonferroni: Float[np.ndarray, " layer"]
    pearson_p_holm: Float[np.ndarray, " layer"]
    pearson_ci: Float[np.ndarray, "layer 2"]
    spearman_rho: Float[np.ndarray, " layer"]
    spearman_p: Float[np.ndarray, " layer"]
    spearman_p_bonferroni: Float[np.ndarray, " layer"]
    spearman_p_holm: Float[np.ndarray, " layer"]
    spearman_ci: Float[np.ndarray, "layer 2"]
    p_maxt: Float[np.ndarray, " layer"]
    best_layer: int
    max_statistic: float
    max_statistic_p: float
    n_permutations: int
    n_bootstrap: int
    confidence: float
    seed: int
    primary_layer: int | None = None
    reference: str | None = None
    excluded: tuple[str, ...] = ()
    without_reference: LayerSweep | None = field(default=None, repr=False)

    @property
    def n_personas(self) -> int:
        """The number of personas the statistics were computed over."""
        return len(self.personas)

    def at(self, layer: int) -> dict[str, Any]:
        """Returns every statistic at block ``layer`` as a JSON-safe dict."""
        if layer not in self.layers:
            invalid("layer", "LayerSweep.at", f"one of the layers {list(self.layers)}", layer)
        j = self.layers.index(layer)
        return {
            "layer": int(layer),
            "n": self.n_personas,
            "pearson": {
                "r": json_float(self.pearson_r[j]),
                "p": json_float(self.pearson_p[j]),
                "p_bonferroni": json_float(self.pearson_p_bonferroni[j]),
                "p_holm": json_float(self.pearson_p_holm[j]),
                "ci": [json_float(v) for v in self.pearson_ci[j]],
            },
            "spearman": {
                "rho": json_float(self.spearman_rho[j]),
                "p": json_float(self.spearman_p[j]),
                "p_bonferroni": json_float(self.spearman_p_bonferroni[j]),
                "p_holm": json_float(self.spearman_p_holm[j]),
                "ci": [json_float(v) for v in self.spearman_ci[j]],
            },
            "p_maxt": json_float(self.p_maxt[j]),
        }

    @property
    def primary(self) -> dict[str, Any] | None:
        """The statistics at the pre-declared ``primary_layer``, or None if none was declared."""
        return None if self.primary_layer is None else self.at(self.primary_layer)

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per layer with every per-layer statistic.

        Columns: layer, n, pearson_r, pearson_p, pearson_p_bonferroni, pearson_p_holm,
        pearson_ci_low, pearson_ci_high, the same six for spearman (``spearman_rho``...),
        p_maxt, is_best, is_primary, and, when the reference persona was present,
        ``pearson_r_without_reference``, ``pearson_p_without_reference``,
        ``spearman_rho_without_reference``, ``spearman_p_without_reference``.
        """
        frame = pd.DataFrame(
            {
                "layer": list(self.layers),
                "n": self.n_personas,
                "pearson_r": self.pearson_r,
                "pearson_p": self.pearson_p,
                "pearson_p_bonferroni": self.pearson_p_bonferroni,
                "pearson_p_holm": self.pearson_p_holm,
                "pearson_ci_low": self.pearson_ci[:, 0],
                "pearson_ci_high": self.pearson_ci[:, 1],
                "spearman_rho": self.spearman_rho,
                "spearman_p": self.spearman_p,
                "spearman_p_bonferroni": self.spearman_p_bonferroni,
                "spearman_p_holm": self.spearman_p_holm,
                "spearman_ci_low": self.spearman_ci[:, 0],
                "spearman_ci_high": self.spearman_ci[:, 1],
                "p_maxt": self.p_maxt,
                "is_best": [layer == self.best_layer for layer in self.layers],
                "is_primary": [layer == self.primary_layer for layer in self.layers],
            }
        )
        if self.without_reference is not None:
            w = self.without_reference
            frame["pearson_r_without_reference"] = w.pearson_r
            frame["pearson_p_without_reference"] = w.pearson_p
            frame["spearman_rho_without_reference"] = w.spearman_rho
            frame["spearman_p_without_reference"] = w.spearman_p
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Returns the sweep as a JSON-safe dict (NaN becomes None).

        Keys: n_personas, personas, layers, statistic, best_layer, max_statistic
        ``{value, p, n_permutations}``, primary_layer, primary (per-layer dict or None),
        per_layer (list of per-layer dicts, see ``at``), n_bootstrap, confidence, seed,
        reference, excluded, without_reference (the same dict without the reference, or None).
        """
        return {
            "n_personas": self.n_personas,
            "personas": list(self.personas),
            "layers": [int(layer) for layer in self.layers],
            "statistic": self.statistic,
            "best_layer": int(self.best_layer),
            "best": self.at(self.best_layer),
            "max_statistic": {
                "value": json_float(self.max_statistic),
                "p": json_float(self.max_statistic_p),
                "n_permutations": self.n_permutations,
            },
            "primary_layer": self.primary_layer,
            "primary": self.primary,
            "per_layer": [self.at(layer) for layer in self.layers],
            "n_bootstrap": self.n_bootstrap,
            "confidence": self.confidence,
            "seed": self.seed,
            "reference": self.reference,
            "excluded": list(self.excluded),
            "without_reference": None
            if self.without_reference is None
            else self.without_reference.to_dict(),
        }

    def summary(self) -> str:
        """Returns a few lines a person reads: the primary layer, then the exploratory best."""
        name = "rho" if self.statistic == "spearman" else "r"
        stat = self.spearman_rho if self.statistic == "spearman" else self.pearson_r
        p = self.spearman_p if self.statistic == "spearman" else self.pearson_p
        holm_p = self.spearman_p_holm if self.statistic == "spearman" else self.pearson_p_holm
        j = self.layers.index(self.best_layer)
        lines = [
            f"Layer sweep: {self.n_personas} personas x {len(self.layers)} layers, "
            f"statistic {self.statistic}."
        ]
        if self.primary_layer is not None:
            i = self.layers.index(self.primary_layer)
            lines.append(
                f"Primary result, layer {self.primary_layer} (declared in advance): "
                f"{name} = {stat[i]:+.3f} (p = {p[i]:.3g}); "
                f"Pearson r = {self.pearson_r[i]:+.3f} (p = {self.pearson_p[i]:.3g})."
            )
        best = (
            "Exploratory: strongest layer" if self.primary_layer is not None else "Strongest layer"
        )
        lines.append(
            f"{best} {self.best_layer}: {name} = {stat[j]:+.3f} "
            f"(p = {p[j]:.3g}, Holm p = {holm_p[j]:.3g})."
        )
        if self.n_permutations:
            lines.append(
                "Max-over-layers permutation test "
                "(is the strongest layer more than the best of noise?): "
                f"|{name}|max = {self.max_statistic:.3f}, p = {self.max_statistic_p:.3g} "
                f"({self.n_permutations} permutations)."
            )
        if self.without_reference is not None:
            w = self.without_reference
            ws = w.spearman_rho if self.statistic == "spearman" else w.pearson_r
            wl = self.primary_layer if self.primary_layer is not None else self.best_layer
            lines.append(
                f"Without the reference persona {self.reference!r} (n = {w.n_personas}), "
                f"layer {wl}: "
                f"{name} = {ws[w.layers.index(wl)]:+.3f}; strongest layer {w.best_layer}."
            )
        if self.excluded:
            lines.append(f"Excluded: {', '.join(self.excluded)}.")
        return "\n".join(lines)


def layer_sweep(
    cosine: Float[Tensor, "persona layer"]
    | Float[np.ndarray, "persona layer"]
    | CosineToReference
    | pd.DataFrame,
    y: PerPersona = None,
    *,
    k: PerPersona = None,
    n: PerPersona = None,
    personas: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    exclude: Sequence[str] | None = None,
    reference: str | None = None,
    primary_layer: int | None = None,
    n_permutations: int = 10_000,
    n_bootstrap: int = 2_000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: str = "spearman",
    progress: bool = True,
) -> LayerSweep:
    """Returns per-layer Pearson/Spearman correlations of ``cosine`` with the rate, honestly.

    Args:
        cosine: ``[persona, layer]`` values: a tensor or array (label it with ``personas`` and
            ``layers``), a wide DataFrame (index personas, columns layers), or a
            ``CosineToReference``, whose labels and reference persona are used.
        y: Rates per persona (fractions), as a sequence in persona order or a ``{name: rate}``
            mapping / Series. Leave None and pass ``k`` and ``n`` to use raw counts.
        k: Marker counts per persona; the rate is ``k / n``.
        n: Completions per persona.
        personas: Names of the rows of ``cosine`` (defaults to ``persona_0``... for arrays).
        layers: Block indices of the columns of ``cosine`` (defaults to ``0..L-1``).
        exclude: Personas to drop before anything is computed (e.g. ``[reference]``).
        reference: The reference persona, whose cosine is 1 by construction. When it is among
            the analysed personas, the sweep is also run without it (``without_reference``).
            Defaults to ``cosine.reference`` for a ``CosineToReference``.
        primary_layer: A layer declared in advance; reported as the primary result.
        n_permutations: Permutations of the max-over-layers test (0 skips it).
        n_bootstrap: Bootstrap resamples of personas for the confidence intervals (0 skips).
        confidence: Level of the bootstrap percentile intervals.
        seed: Seeds the permutations and the bootstrap (independent streams).
        statistic: ``"spearman"`` or ``"pearson"``: which statistic picks the strongest layer
            and is maximised in the permutation test.
        progress: Show progress bars over permutations and resamples (on a terminal).

    Returns:
        A ``LayerSweep``.

    Raises:
        ValueError: On fewer than 3 personas, duplicate names, NaN, counts with ``k > n`` or
            negative, a constant rate or a constant cosine at some layer, an unknown
            excluded/reference persona or a ``primary_layer`` not swept.
    """
    func = "layer_sweep"
    statistic = check_one_of(statistic, "statistic", func, STATISTICS)
    n_permutations = _check_count(n_permutations, "n_permutations", func)
    n_bootstrap = _check_count(n_bootstrap, "n_bootstrap", func)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        invalid("seed", func, "an int", seed, exc=TypeError)
    if not 0.0 < float(confidence) < 1.0:
        invalid("confidence", func, "a float in (0, 1)", confidence)

    x, names, layer_labels, default_ref = _cosine_matrix(cosine, personas, layers, func)
    reference = default_ref if reference is None else reference
    rate, _, _ = rates_from(y, k, n, names, func)

    excluded = tuple(check_unique_names(list(exclude), "exclude", func)) if exclude else ()
    for name in excluded:
        if name not in names:
            invalid("exclude", func, f"persona names among {names}", name)
    if reference is not None and reference not in names:
        invalid("reference", func, f"one of the persona names {names}", reference)
    if primary_layer is not None and primary_layer not in layer_labels:
        invalid("primary_layer", func, f"one of the swept layers {layer_labels}", primary_layer)

    keep = [i for i, name in enumerate(names) if name not in excluded]
    kept = tuple(names[i] for i in keep)
    log.info(
        "layer sweep: %d personas x %d layers, %d permutations, %d bootstrap resamples",
        len(keep),
        len(layer_labels),
        n_permutations,
        n_bootstrap,
    )
    settings = dict(
        layers=tuple(layer_labels),
        statistic=statistic,
        n_permutations=n_permutations,
        n_bootstrap=n_bootstrap,
        confidence=float(confidence),
        seed=int(seed),
        primary_layer=None if primary_layer is None else int(primary_layer),
        reference=reference,
        excluded=excluded,
        progress=bool(progress),
    )
    without_reference = None
    if reference is not None and reference in kept:
        no_ref = [i for i in keep if names[i] != reference]
        try:
            without_reference = _sweep(
                x[no_ref], rate[no_ref], tuple(names[i] for i in no_ref), **settings
            )
        except ValueError as e:  # e.g. two personas left, or a constant rate without the reference
            log.warning(
                "layer sweep without the reference persona %r not computed: %s", reference, e
            )
    return _sweep(x[keep], rate[keep], kept, without_reference=without_reference, **settings)


def _sweep(
    x: np.ndarray,
    y: np.ndarray,
    personas: tuple[str, ...],
    *,
    layers: tuple[int, ...],
    statistic: str,
    n_permutations: int,
    n_bootstrap: int,
    confidence: float,
    seed: int,
    primary_layer: int | None,
    reference: str | None,
    excluded: tuple[str, ...],
    progress: bool = True,
    without_reference: LayerSweep | None = None,
) -> LayerSweep:
    func = "layer_sweep"
    n_p = x.shape[0]
    if n_p < 3:
        invalid(
            "cosine",
            func,
            "values for at least 3 personas (after exclusions)",
            f"{n_p}: {list(personas)}",
        )
    xs, ys = standardize(x, 0), standardize(y)
    if np.isnan(ys).any():
        invalid(
            "y",
            func,
            "rates that vary across personas (a constant rate has no correlation)",
            f"every rate = {y[0]!r}",
        )
    constant = [layers[j] for j in np.flatnonzero(np.isnan(xs).any(axis=0))]
    if constant:
        invalid(
            "cosine",
            func,
            "values that vary across personas at every layer",
            f"a constant cosine at layers {constant}",
        )
    xr, yr = standardize(rank(x, 0), 0), standardize(rank(y))

    r, pr = correlate(x, y[:, None], axis=0)
    rho, prho = correlate(rank(x, 0), rank(y)[:, None], axis=0)

    ss_perm, ss_boot = np.random.SeedSequence(seed).spawn(2)
    basis, target = (xr, yr) if statistic == "spearman" else (xs, ys)
    observed = np.abs(basis.T @ target)
    best = int(np.argmax(observed))
    max_obs = float(observed[best])
    if n_permutations:
        max_p, p_maxt = _max_permutation_test(
            basis,
            target,
            observed,
            n_permutations,
            np.random.default_rng(ss_perm),
            progress=progress,
        )
    else:
        max_p, p_maxt = math.nan, np.full(len(layers), np.nan)

    if n_bootstrap:
        boot_r, boot_rho = _bootstrap(
            x, y, n_bootstrap, np.random.default_rng(ss_boot), progress=progress
        )
        q = 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2])
        with np.errstate(invalid="ignore"):
            r_ci = np.nanpercentile(boot_r, q, axis=0).T
            rho_ci = np.nanpercentile(boot_rho, q, axis=0).T
    else:
        r_ci = rho_ci = np.full((len(layers), 2), np.nan)

    return LayerSweep(
        layers=layers,
        personas=personas,
        statistic=statistic,
        pearson_r=r,
        pearson_p=pr,
        pearson_p_bonferroni=bonferroni(pr),
        pearson_p_holm=holm(pr),
        pearson_ci=np.ascontiguousarray(r_ci, dtype=np.float64),
        spearman_rho=rho,
        spearman_p=prho,
        spearman_p_bonferroni=bonferroni(prho),
        spearman_p_holm=holm(prho),
        spearman_ci=np.ascontiguousarray(rho_ci, dtype=np.float64),
        p_maxt=p_maxt,
        best_layer=layers[best],
        max_statistic=max_obs,
        max_statistic_p=max_p,
        n_permutations=n_permutations,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
        primary_layer=primary_layer,
        reference=reference,
        excluded=excluded,
        without_reference=without_reference,
    )


def _permutation_chunks(
    target: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yields ``[chunk, persona]`` blocks of ``target`` shuffled independently per row."""
    chunk = max(1, CHUNK_ELEMENTS // target.shape[0])
    done = 0
    while done < n_permutations:
        c = min(chunk, n_permutations - done)
        yield rng.permuted(np.tile(target, (c, 1)), axis=1)
        done += c


def _max_permutation_test(
    basis: np.ndarray,
    target: np.ndarray,
    observed: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    *,
    progress: bool = True,
) -> tuple[float, np.ndarray]:
    """Returns the permutation p-value of ``max(observed)`` and the per-layer max-T p-values.

    ``basis`` is ``[persona, layer]`` and ``target`` ``[persona]``, both standardised (centred,
    unit norm), so a shuffled target's correlations with every layer are one matrix product.
    """
    max_obs = observed.max()
    count_max = 0
    count_layer = np.zeros(observed.shape[0], dtype=np.int64)
    with tqdm(
        total=n_permutations,
        desc="permutations",
        unit="perm",
        disable=None if progress else True,
        leave=False,
    ) as bar:
        for block in _permutation_chunks(target, n_permutations, rng):
            maxima = np.abs(block @ basis).max(axis=1)
            count_max += int((maxima >= max_obs - TIE_TOL).sum())
            count_layer += (maxima[:, None] >= observed[None, :] - TIE_TOL).sum(axis=0)
            bar.update(block.shape[0])
    return (1 + count_max) / (1 + n_permutations), (1 + count_layer) / (1 + n_permutations)


def _bootstrap_counts(
    n_personas: int, n_bootstrap: int, chunk: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yields ``[chunk, persona]`` draw counts of bootstrap resamples (each row sums to P).

    Resample ``b`` draws ``rng.integers(0, P, size=P)``; a row of counts says how many times
    each persona was drawn.
    """
    done = 0
    while done < n_bootstrap:
        c = min(chunk, n_bootstrap - done)
        idx = rng.integers(0, n_personas, size=(c, n_personas))
        counts = np.zeros((c, n_personas))
        np.add.at(counts, (np.arange(c)[:, None], idx), 1.0)
        yield counts
        done += c


def _tie_groups(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns, per sorted position, the first and last position of its run of equal values.

    ``sorted_values`` is ``[..., persona]``, sorted along the last axis.
    """
    p = sorted_values.shape[-1]
    pos = np.broadcast_to(np.arange(p), sorted_values.shape)
    new = np.ones(sorted_values.shape, dtype=bool)
    new[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=-1)
    end = np.ones(sorted_values.shape, dtype=bool)
    end[..., :-1] = new[..., 1:]
    last = np.flip(
        np.minimum.accumulate(np.flip(np.where(end, pos, p - 1), axis=-1), axis=-1), axis=-1
    )
    return first, last


def _resample_ranks(
    ws: np.ndarray, first: np.ndarray, last: np.ndarray, tied: np.ndarray
) -> np.ndarray:
    """Returns the average rank of each sorted position within the resamples, ties averaged.

    ``ws`` is ``[chunk, column, persona]``: draw counts with personas sorted by the column's
    values. A persona drawn ``w`` times after ``c`` drawn values below it occupies ranks
    ``c + 1 .. c + w``, so its average rank is ``c + (w + 1) / 2`` — what ``rankdata`` gives on
    the expanded resample. Columns flagged in ``tied`` (``[column]``) have equal values, which
    share the average rank of their whole run (``first``/``last``: ``[column, persona]``).
    """
    ranks = np.cumsum(ws, axis=-1)
    cum = ranks.copy() if tied.any() else ranks
    ranks -= 0.5 * ws
    ranks += 0.5
    for j in np.flatnonzero(tied):
        before = (cum[:, j] - ws[:, j])[:, first[j]]
        total = cum[:, j][:, last[j]] - before
        ranks[:, j] = before + 0.5 * (total + 1.0)
    return ranks


def _bootstrap(
    x: np.ndarray,
    y: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
    *,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``[n_bootstrap, layer]`` Pearson and Spearman values over persona resamples.

    A resample is a row of draw counts ``w``. Pearson's weighted moments are then matrix
    products with the original values. For Spearman, personas are sorted once per layer;
    a resample's ranks are cumulative sums of its counts in that order, and every resample's
    ranks average ``(P + 1) / 2`` exactly, which centres them without a pass over the data.
    """
    p, n_layers = x.shape
    # Centring first keeps the one-pass weighted moments well conditioned.
    xc, yc = x - x.mean(axis=0), y - y.mean()
    order = np.argsort(x.T, axis=-1, kind="stable")  # [layer, persona]
    x_sorted = np.take_along_axis(x.T, order, axis=-1)
    first, last = _tie_groups(x_sorted)
    tied = (np.diff(x_sorted, axis=-1) == 0).any(axis=-1)
    y_order = np.argsort(y, kind="stable")[None]
    y_first, y_last = _tie_groups(y[y_order])
    y_tied = np.array([bool((np.diff(y[y_order][0]) == 0).any())])
    y_inverse = np.argsort(y_order[0])
    mid = (p + 1) / 2.0
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // (p * n_layers))
    out_r, out_rho = [], []
    with tqdm(
        total=n_bootstrap,
        desc="bootstrap",
        unit="resample",
        disable=None if progress else True,
        leave=False,
    ) as bar:
        for w in _bootstrap_counts(p, n_bootstrap, chunk, rng):
            # Pearson: weighted moments (weights sum to P) as matrix products.
            mx, my = (w @ xc) / p, (w @ yc)[:, None] / p
            cov = (w * yc) @ xc / p - mx * my
            vx = (w @ (xc * xc)) / p - mx * mx
            vy = (w @ (yc * yc))[:, None] / p - my * my
            out_r.append(_safe_corr(cov, vx, vy, np.abs(xc).max(axis=0) + np.abs(yc).max()))
            # Spearman: ranks within each resample, in each layer's sorted order.
            ws = w[:, order]  # [chunk, layer, persona sorted by x]
            rx = _resample_ranks(ws, first, last, tied)
            rx -= mid
            ry = (_resample_ranks(w[:, y_order], y_first, y_last, y_tied)[:, 0] - mid)[:, y_inverse]
            ws *= rx  # ws now holds w * rank(x), centred; einsum avoids further temporaries
            cov = np.einsum("clp,clp->cl", ws, ry[:, order]) / p
            vx = np.einsum("clp,clp->cl", ws, rx) / p
            vy = (w * ry * ry).sum(axis=-1, keepdims=True) / p
            out_rho.append(_safe_corr(cov, vx, vy, float(p)))
            bar.update(w.shape[0])
    return np.concatenate(out_r), np.concatenate(out_rho)


def _safe_corr(
    cov: np.ndarray, vx: np.ndarray, vy: np.ndarray, scale: np.ndarray | float
) -> np.ndarray:
    """Returns ``cov / sqrt(vx * vy)``, NaN where a resample leaves a variable (near) constant."""
    tiny = 1e-20 * np.asarray(scale) ** 2
    degenerate = (vx <= tiny) | (vy <= tiny)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(vx * vy)
    return np.where(degenerate, np.nan, np.clip(r, -1.0, 1.0))


def _check_count(value: Any, param: str, func: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        invalid(param, func, "an int >= 0", value, exc=TypeError)
    if int(value) < 0:
        invalid(param, func, "an int >= 0", value)
    return int(value)


def _cosine_matrix(
    cosine: Any, personas: Sequence[str] | None, layers: Sequence[int] | None, func: str
) -> tuple[np.ndarray, list[str], list[int], str | None]:
    """Returns ``(values [persona, layer] float64, persona names, layer labels, reference)``."""
    reference = None
    if isinstance(cosine, CosineToReference):
        values = cosine.values.detach().cpu().double().numpy()
        personas = list(cosine.personas) if personas is None else personas
        layers = list(cosine.layers) if layers is None else layers
        reference = cosine.reference
    elif isinstance(cosine, pd.DataFrame):
        values = cosine.to_numpy(dtype=np.float64)
        personas = [str(p) for p in cosine.index] if personas is None else personas
        if layers is None:
            try:
                layers = [int(c) for c in cosine.columns]
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"The 'cosine' parameter of {func} must be a wide table whose columns "
                    "are layer numbers. "
                    f"Got columns {list(cosine.columns)} instead."
                ) from e
    elif isinstance(cosine, torch.Tensor):
        values = cosine.detach().cpu().double().numpy()
    elif isinstance(cosine, np.ndarray):
        values = np.asarray(cosine, dtype=np.float64)
    else:
        invalid(
            "cosine",
            func,
            "a [persona, layer] tensor/array, a wide DataFrame or a CosineToReference",
            type(cosine).__name__,
            exc=TypeError,
        )
    if values.ndim != 2:
        invalid("cosine", func, "2-D, shaped [persona, layer]", f"shape {values.shape}")
    n_p, n_l = values.shape
    names = [f"persona_{i}" for i in range(n_p)] if personas is None else list(personas)
    if len(names) != n_p:
        invalid("personas", func, f"{n_p} names (one per row of cosine)", f"{len(names)} names")
    check_unique_names(names, "personas", func)
    labels = list(range(n_l)) if layers is None else [int(layer) for layer in layers]
    if len(labels) != n_l:
        invalid(
            "layers",
            func,
            f"{n_l} layer labels (one per column of cosine)",
            f"{len(labels)} labels",
        )
    if len(set(labels)) != n_l:
        invalid("layers", func, "unique layer labels", labels)
    bad = ~np.isfinite(values)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        invalid(
            "cosine",
            func,
            "finite values (no NaN or inf)",
            f"{values[i, j]} for {names[i]!r} at layer {labels[j]}",
        )
    return values, names, labels, reference
