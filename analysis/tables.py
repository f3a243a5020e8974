"""Per-persona tables: reading a CSV or DataFrame, and pooling marker counts over seeds."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from persona_geometry._validation import invalid, renamed
from persona_geometry.stats import check_counts, json_float

__all__ = ["PooledCounts", "pool_seeds", "read_table", "require_columns"]


@dataclass(frozen=True, kw_only=True, eq=False)
class PooledCounts:
    """Marker counts summed over seeds, with the per-seed rates kept.

    Attributes:
        personas: Persona names, in first-seen order.
        k, n: Counts summed over seeds.
        per_seed: persona × seed table of per-seed rates (NaN where a seed lacks a persona).
        per_seed_k, per_seed_n: The same tables of counts.
    """

    personas: tuple[str, ...]
    k: Float[np.ndarray, " persona"]
    n: Float[np.ndarray, " persona"]
    per_seed: pd.DataFrame = field(repr=False)
    per_seed_k: pd.DataFrame = field(repr=False)
    per_seed_n: pd.DataFrame = field(repr=False)

    @property
    def rate(self) -> np.ndarray:
        """Pooled rate ``sum(k) / sum(n)`` per persona."""
        return self.k / self.n

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per persona: k, n, rate and ``rate_seed_<s>`` per seed."""
        frame = pd.DataFrame(
            {"persona": list(self.personas), "k": self.k, "n": self.n, "rate": self.rate}
        )
        for s in self.per_seed.columns:
            frame[f"rate_seed_{s}"] = self.per_seed[s].to_numpy()
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Returns ``{persona: {k, n, rate, per_seed {seed: rate}}}``."""
        return {
            p: {
                "k": int(self.k[i]),
                "n": int(self.n[i]),
                "rate": float(self.rate[i]),
                "per_seed": {
                    str(s): json_float(self.per_seed.loc[p, s]) for s in self.per_seed.columns
                },
            }
            for i, p in enumerate(self.personas)
        }

    def summary(self) -> str:
        """Returns one line: how many personas and seeds were pooled."""
        return (
            f"Pooled {len(self.personas)} personas over {self.per_seed.shape[1]} seeds "
            "(counts add; per-seed rates kept)."
        )


def pool_seeds(
    table: pd.DataFrame,
    *,
    persona: str = "persona",
    seed_column: str = "seed",
    k: str = "k",
    n: str = "n",
    seed: str | None = None,
) -> PooledCounts:
    """Returns counts summed over seeds per persona, keeping every seed's rate.

    Args:
        table: One row per (persona, seed) with raw counts.
        persona, seed_column, k, n: Column names.
        seed: Deprecated name of ``seed_column`` (``seed`` means an RNG seed elsewhere).

    Raises:
        ValueError: On a missing column, a (persona, seed) pair given twice, or bad counts.
    """
    func = "pool_seeds"
    # "seed" is also the default column name, so only a non-default seed_column conflicts.
    seed = (
        renamed(
            None if seed_column == "seed" else seed_column,
            seed,
            new="seed_column",
            old="seed",
            func=func,
        )
        or seed_column
    )
    require_columns(table, {"persona": persona, "seed_column": seed, "k": k, "n": n}, func)
    dup = table.duplicated([persona, seed])
    if dup.any():
        row = table.loc[dup, [persona, seed]].iloc[0].tolist()
        invalid(
            "table", func, "one row per (persona, seed)", f"(persona, seed) = {tuple(row)} twice"
        )
    names = [str(p) for p in dict.fromkeys(table[persona])]
    check_counts(
        table[k].to_numpy(dtype=np.float64),
        table[n].to_numpy(dtype=np.float64),
        [f"{p} (seed {s})" for p, s in zip(table[persona], table[seed], strict=True)],
        func,
    )
    frame = table.assign(**{persona: table[persona].astype(str)})
    per_k = frame.pivot(index=persona, columns=seed, values=k).reindex(names)
    per_n = frame.pivot(index=persona, columns=seed, values=n).reindex(names)
    return PooledCounts(
        personas=tuple(names),
        k=per_k.sum(axis=1).to_numpy(dtype=np.float64),
        n=per_n.sum(axis=1).to_numpy(dtype=np.float64),
        per_seed=per_k / per_n,
        per_seed_k=per_k,
        per_seed_n=per_n,
    )


def require_columns(table: pd.DataFrame, columns: Mapping[str, str | None], func: str) -> None:
    """Raises ValueError naming the parameter whose column the table lacks."""
    for param, col in columns.items():
        if col is not None and col not in table.columns:
            invalid(param, func, f"a column of the table {list(map(str, table.columns))}", col)


def read_table(table: pd.DataFrame | str | os.PathLike[str], func: str) -> pd.DataFrame:
    """Returns ``table`` itself, or the CSV it names read into a DataFrame."""
    if isinstance(table, pd.DataFrame):
        return table
    if not isinstance(table, str | os.PathLike):
        invalid("table", func, "a DataFrame or a CSV path", type(table).__name__, exc=TypeError)
    if not os.path.exists(table):
        raise FileNotFoundError(
            f"The 'table' parameter of {func} must be an existing CSV file. "
            f"Got {str(table)!r} instead."
        )
    try:
        return pd.read_csv(table)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(
            f"The 'table' parameter of {func} must be a readable CSV file. "
            f"Got {str(table)!r} ({e}) instead."
        ) from e
