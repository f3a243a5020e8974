"""Fits within each persona category, or the reason a category was skipped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from persona_geometry._validation import invalid
from persona_geometry.analysis.fits import Correlation, correlation

__all__ = ["CategoryFit", "category_labels", "within_category"]


@dataclass(frozen=True, kw_only=True)
class CategoryFit:
    """Correlation within one category, or why it was skipped."""

    category: str
    personas: tuple[str, ...]
    correlation: Correlation | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns ``{n, pearson, spearman}`` or ``{n, skipped}``."""
        if self.correlation is None:
            return {"n": len(self.personas), "skipped": self.skipped}
        return self.correlation.to_dict()


def category_labels(categories: Any, names: list[str], func: str) -> list[str]:
    """Returns one category per persona from a sequence or mapping (``"all"`` when None)."""
    if categories is None:
        return ["all"] * len(names)
    if isinstance(categories, Mapping):
        missing = [p for p in names if p not in categories]
        if missing:
            invalid("categories", func, "a category for every persona", f"none for {missing}")
        return [str(categories[p]) for p in names]
    cats = [str(c) for c in categories]
    if len(cats) != len(names):
        invalid("categories", func, f"{len(names)} categories (one per persona)", len(cats))
    return cats


def within_category(
    x: np.ndarray, y: np.ndarray, names: list[str], cats: list[str]
) -> tuple[CategoryFit, ...]:
    """Returns the correlation within every category, in first-seen order."""
    out = []
    for cat in dict.fromkeys(cats):
        idx = [i for i, c in enumerate(cats) if c == cat]
        members = tuple(names[i] for i in idx)
        if len(idx) < 3:
            out.append(
                CategoryFit(
                    category=cat, personas=members, skipped=f"fewer than 3 personas (n={len(idx)})"
                )
            )
        elif np.ptp(x[idx]) == 0:
            out.append(
                CategoryFit(
                    category=cat, personas=members, skipped="constant x within the category"
                )
            )
        elif np.ptp(y[idx]) == 0:
            out.append(
                CategoryFit(
                    category=cat, personas=members, skipped="constant rate within the category"
                )
            )
        else:
            out.append(
                CategoryFit(category=cat, personas=members, correlation=correlation(x[idx], y[idx]))
            )
    return tuple(out)
