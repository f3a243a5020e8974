"""Pairwise leakage against pairwise geometry: does the marker leak to personas that sit close?

With several source personas trained, evaluation gives a leakage matrix: the marker rate of every
target persona under each source's adapter. Per layer, its off-diagonal entries are correlated
with the pairwise cosine matrix. Pairs that share a persona are not independent, so p-values come
from a Mantel test: persona labels of the cosine matrix are permuted jointly on rows and columns
and the correlation recomputed. Both directed pairs (source → target) and symmetrised pairs
(mean of both directions, for personas that were both source and target) are reported, with a
max-over-layers permutation p-value as in the layer sweep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from tqdm.auto import tqdm

from persona_geometry._validation import check_one_of, check_unique_names, invalid
from persona_geometry.geometry import PairwiseCosine
from persona_geometry.stats import (
    CHUNK_ELEMENTS,
    STATISTICS,
    TIE_TOL,
    json_float,
    rank,
    standardize,
)

__all__ = ["LeakageCorrelation", "leakage_correlation"]


@dataclass(frozen=True, kw_only=True, eq=False)
class LeakageCorrelation:
    """Per-layer correlation of pairwise leakage with pairwise cosine, with Mantel p-values.

    Attributes:
        layers: Block indices.
        sources: Source personas (rows of the leakage matrix).
        targets: Target personas (columns).
        statistic: The statistic whose maximum over layers is permutation-tested.
        directed: ``[layer, 4]`` Pearson r, its Mantel p, Spearman ρ, its Mantel p over
            directed pairs (source ≠ target).
        symmetric: The same over unordered pairs of personas that were both source and target,
            leakage averaged over both directions; None when fewer than 3 such pairs exist.
        n_directed, n_symmetric: Number of pairs.
        max_p_directed, max_p_symmetric: Permutation p-value of the max-over-layers ``|statistic|``.
        n_permutations, seed: The settings used.
    """

    layers: tuple[int, ...]
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    statistic: str
    directed: Float[np.ndarray, "layer 4"]
    symmetric: Float[np.ndarray, "layer 4"] | None
    n_directed: int
    n_symmetric: int
    max_p_directed: float
    max_p_symmetric: float
    n_permutations: int
    seed: int

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per layer: directed and symmetrised r, ρ and their Mantel p-values."""
        cols = ["pearson_r", "pearson_p_mantel", "spearman_rho", "spearman_p_mantel"]
        frame = pd.DataFrame({"layer": list(self.layers), "n_directed": self.n_directed})
        for i, c in enumerate(cols):
            frame[f"directed_{c}"] = self.directed[:, i]
        frame["n_symmetric"] = self.n_symmetric
        for i, c in enumerate(cols):
            frame[f"symmetric_{c}"] = math.nan if self.symmetric is None else self.symmetric[:, i]
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict: settings, per-layer rows, and the max-over-layers p-values."""
        return {
            "layers": list(self.layers),
            "sources": list(self.sources),
            "targets": list(self.targets),
            "statistic": self.statistic,
            "n_directed": self.n_directed,
            "n_symmetric": self.n_symmetric,
            "max_p_directed": json_float(self.max_p_directed),
            "max_p_symmetric": json_float(self.max_p_symmetric),
            "n_permutations": self.n_permutations,
            "seed": self.seed,
            "per_layer": [
                {k: (json_float(v) if k != "layer" else int(v)) for k, v in row.items()}
                for row in self.to_frame().to_dict("records")
            ],
        }

    def summary(self) -> str:
        """Returns the strongest layer for directed and symmetrised pairs, with Mantel p-values."""
        j = 2 if self.statistic == "spearman" else 0
        name = "rho" if self.statistic == "spearman" else "r"
        lines = [
            f"Leakage vs pairwise cosine: {len(self.sources)} sources x "
            f"{len(self.targets)} targets, "
            f"{len(self.layers)} layers."
        ]
        for label, arr, n, pmax in (
            ("directed", self.directed, self.n_directed, self.max_p_directed),
            ("symmetrised", self.symmetric, self.n_symmetric, self.max_p_symmetric),
        ):
            if arr is None:
                lines.append(f"{label}: fewer than 3 pairs, not computed.")
                continue
            b = int(np.argmax(np.abs(arr[:, j])))
            lines.append(
                f"{label} ({n} pairs): strongest layer {self.layers[b]}, {name} = {arr[b, j]:+.3f} "
                f"(Mantel p = {arr[b, j + 1]:.3g}; max-over-layers p = {pmax:.3g})."
            )
        return "\n".join(lines)


def leakage_correlation(
    leakage: pd.DataFrame | Float[np.ndarray, "source target"],
    pairwise: PairwiseCosine | Float[np.ndarray, "layer persona persona"],
    *,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    personas: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    n_permutations: int = 10_000,
    seed: int = 0,
    statistic: str = "spearman",
    progress: bool = True,
) -> LeakageCorrelation:
    """Returns the per-layer correlation of leakage with pairwise cosine, Mantel-tested.

    Args:
        leakage: Marker rate of each target (columns) under each source's adapter (rows): a
            DataFrame labelled by persona names, or an array with ``sources``/``targets``.
        pairwise: ``[layer, persona, persona]`` cosines: a ``PairwiseCosine`` or an array with
            ``personas``/``layers``. Every source and target must be among its personas.
        sources, targets: Row and column names of an array ``leakage``.
        personas, layers: Labels of an array ``pairwise``.
        n_permutations: Permutations of persona labels (Mantel test); must be >= 1.
        seed: Seeds the permutations.
        statistic: ``"spearman"`` or ``"pearson"`` for the max-over-layers test.
        progress: Show a progress bar over the permutations (on a terminal).

    Raises:
        ValueError: On NaN leakage, unknown personas, fewer than 3 directed pairs, or a
            constant leakage or cosine over the pairs.
    """
    func = "leakage_correlation"
    statistic = check_one_of(statistic, "statistic", func, STATISTICS)
    if (
        isinstance(n_permutations, bool)
        or not isinstance(n_permutations, int | np.integer)
        or n_permutations < 1
    ):
        invalid("n_permutations", func, "an int >= 1", n_permutations)
    if isinstance(leakage, pd.DataFrame):
        sources = [str(s) for s in leakage.index] if sources is None else sources
        targets = [str(t) for t in leakage.columns] if targets is None else targets
        leak = leakage.to_numpy(dtype=np.float64)
    else:
        leak = np.asarray(leakage, dtype=np.float64)
        if sources is None or targets is None:
            invalid(
                "sources",
                func,
                "the row and column names (sources= and targets=) of an array leakage matrix",
                None,
                exc=TypeError,
            )
    sources = check_unique_names([str(s) for s in sources], "sources", func)
    targets = check_unique_names([str(t) for t in targets], "targets", func)
    if leak.shape != (len(sources), len(targets)):
        invalid(
            "leakage", func, f"shaped [source={len(sources)}, target={len(targets)}]", leak.shape
        )

    if isinstance(pairwise, PairwiseCosine):
        cos = pairwise.values.detach().cpu().double().numpy()
        personas = list(pairwise.personas) if personas is None else personas
        layers = list(pairwise.layers) if layers is None else layers
    else:
        cos = np.asarray(pairwise, dtype=np.float64)
        if personas is None:
            invalid(
                "personas",
                func,
                "the persona names of an array pairwise matrix",
                None,
                exc=TypeError,
            )
    names = check_unique_names([str(p) for p in personas], "personas", func)
    if cos.ndim != 3 or cos.shape[1:] != (len(names), len(names)):
        invalid(
            "pairwise",
            func,
            f"shaped [layer, persona={len(names)}, persona={len(names)}]",
            cos.shape,
        )
    layers = list(range(cos.shape[0])) if layers is None else [int(layer) for layer in layers]
    if len(layers) != cos.shape[0]:
        invalid("layers", func, f"{cos.shape[0]} layer labels", len(layers))
    for param, group in (("sources", sources), ("targets", targets)):
        for name in group:
            if name not in names:
                invalid(param, func, f"personas of the pairwise cosine matrix {names}", name)

    universe = [p for p in names if p in set(sources) | set(targets)]
    u_index = {p: i for i, p in enumerate(universe)}
    full_index = [names.index(p) for p in universe]
    cos_u = cos[:, full_index][:, :, full_index]
    if not np.isfinite(cos_u).all():
        invalid("pairwise", func, "finite cosines", "NaN or inf values")

    directed = [
        (u_index[s], u_index[t], leak[i, j], (s, t))
        for i, s in enumerate(sources)
        for j, t in enumerate(targets)
        if s != t
    ]
    bad = [pair[3] for pair in directed if not math.isfinite(pair[2])]
    if bad:
        invalid(
            "leakage",
            func,
            "finite rates for every off-diagonal (source, target) pair",
            f"NaN/inf for {bad[:5]}",
        )
    if len(directed) < 3:
        invalid("leakage", func, "at least 3 off-diagonal (source, target) pairs", len(directed))
    both = [p for p in universe if p in sources and p in targets]
    sym = []
    for a_i, a in enumerate(both):
        for b in both[a_i + 1 :]:
            value = 0.5 * (
                leak[sources.index(a), targets.index(b)] + leak[sources.index(b), targets.index(a)]
            )
            sym.append((u_index[a], u_index[b], value, (a, b)))

    rng = np.random.default_rng(np.random.SeedSequence(seed))
    perms = _permutations(len(universe), n_permutations, rng)
    d_stats, d_max = _mantel(
        cos_u,
        directed,
        perms,
        statistic,
        closed=set(sources) == set(targets) == set(universe),
        func=func,
        progress=progress,
    )
    s_stats, s_max = (None, math.nan)
    if len(sym) >= 3:
        s_stats, s_max = _mantel(
            cos_u,
            sym,
            perms,
            statistic,
            closed=len(both) == len(universe),
            func=func,
            progress=progress,
        )
    return LeakageCorrelation(
        layers=tuple(layers),
        sources=tuple(sources),
        targets=tuple(targets),
        statistic=statistic,
        directed=d_stats,
        symmetric=s_stats,
        n_directed=len(directed),
        n_symmetric=len(sym),
        max_p_directed=d_max,
        max_p_symmetric=s_max,
        n_permutations=int(n_permutations),
        seed=int(seed),
    )


def _permutations(m: int, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """Returns ``[n_permutations, m]`` independent random permutations of ``range(m)``."""
    return rng.permuted(np.tile(np.arange(m), (n_permutations, 1)), axis=1)


def _mantel(
    cos: np.ndarray,
    pairs: list[tuple[int, int, float, Any]],
    perms: np.ndarray,
    statistic: str,
    *,
    closed: bool,
    func: str,
    progress: bool = True,
) -> tuple[np.ndarray, float]:
    """Returns ``[layer, 4]`` (r, p, ρ, p) and the max-over-layers p for one set of pairs.

    Each permutation relabels the personas of ``cos`` (rows and columns together); the pairs'
    leakage values stay put. When the pair set is closed under relabelling (every ordered or
    unordered pair of the same personas), the multiset of cosines is unchanged, so the ranks
    are computed once and permuted with them; otherwise each permutation is re-ranked.
    """
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    leak = np.array([p[2] for p in pairs])
    obs_cos = cos[:, a, b]  # [layer, pair]
    ls, lr = standardize(leak), standardize(rank(leak))
    if np.isnan(ls).any():
        invalid(
            "leakage",
            func,
            "rates that vary across the off-diagonal pairs",
            f"every rate = {leak[0]!r}",
        )
    cs, cr = standardize(obs_cos, axis=1), standardize(rank(obs_cos, axis=1), axis=1)
    if np.isnan(cs).any():
        invalid(
            "pairwise",
            func,
            "cosines that vary across the pairs at every layer",
            "a constant cosine",
        )
    obs_r, obs_rho = cs @ ls, cr @ lr
    rank_matrix = None
    if closed:
        rank_matrix = np.zeros_like(cos)
        rank_matrix[:, a, b] = rank(obs_cos, axis=1)
        rank_matrix[:, b, a] = rank_matrix[:, a, b] if _symmetric(pairs) else rank_matrix[:, b, a]
    n_layers = cos.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // (n_layers * len(pairs)))
    cnt_r = np.zeros(n_layers)
    cnt_rho = np.zeros(n_layers)
    cnt_max = 0
    obs_stat = np.abs(obs_rho if statistic == "spearman" else obs_r)
    max_obs = obs_stat.max()
    with tqdm(
        total=len(perms),
        desc="Mantel permutations",
        unit="perm",
        disable=None if progress else True,
        leave=False,
    ) as bar:
        for start in range(0, len(perms), chunk):
            block = perms[start : start + chunk]
            pa, pb = block[:, a], block[:, b]  # [chunk, pair]
            values = cos[:, pa, pb]  # [layer, chunk, pair]
            r = np.einsum("lcp,p->lc", standardize(values, axis=2), ls)
            if rank_matrix is not None:
                ranks = rank_matrix[:, pa, pb]
            else:
                ranks = rank(values, axis=2)
            rho = np.einsum("lcp,p->lc", standardize(ranks, axis=2), lr)
            cnt_r += (np.abs(r) >= np.abs(obs_r)[:, None] - TIE_TOL).sum(axis=1)
            cnt_rho += (np.abs(rho) >= np.abs(obs_rho)[:, None] - TIE_TOL).sum(axis=1)
            stat = np.abs(rho if statistic == "spearman" else r)
            # A permutation that makes a layer constant over the pairs has no correlation there.
            cnt_max += int(
                (
                    np.nanmax(np.where(np.isnan(stat), -np.inf, stat), axis=0) >= max_obs - TIE_TOL
                ).sum()
            )
            bar.update(len(block))
    b_total = len(perms)
    out = np.column_stack(
        [obs_r, (1 + cnt_r) / (1 + b_total), obs_rho, (1 + cnt_rho) / (1 + b_total)]
    )
    return out, (1 + cnt_max) / (1 + b_total)


def _symmetric(pairs: list[tuple[int, int, float, Any]]) -> bool:
    """True for unordered pairs (each persona pair once), False for directed pairs."""
    seen = {(p[0], p[1]) for p in pairs}
    return not any((p[1], p[0]) in seen for p in pairs)
