"""Centroids, centering and cosine geometry of personas, per layer.

The flow is ``centroids(acts)`` → ``center(...)`` → ``cosine_to_reference(...)`` or
``pairwise_cosine(...)``. Each step returns a small labelled result with ``.to_frame()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from persona_geometry._validation import invalid
from persona_geometry.activations import ActivationSet

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Centroids",
    "Centering",
    "CosineToReference",
    "PairwiseCosine",
    "centroids",
    "center",
    "cosine_to_reference",
    "pairwise_cosine",
]


@dataclass(frozen=True, kw_only=True)
class Centroids:
    """Per-persona, per-layer mean activation over questions.

    Attributes:
        values: ``[persona, layer, d_model]``.
        personas: Persona names along the first axis.
        categories: Persona categories, same order.
        layers: Block indices along the second axis.
        hook: The hook point the activations came from.
        centered_on: Names of the centering set if these centroids were centered, else None.
    """

    values: Float[Tensor, "persona layer d_model"]
    personas: tuple[str, ...]
    categories: tuple[str, ...]
    layers: tuple[int, ...]
    hook: str = "resid_post"
    centered_on: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.values.shape[:2] != (len(self.personas), len(self.layers)):
            invalid(
                "values",
                "Centroids",
                f"shaped [persona={len(self.personas)}, layer={len(self.layers)}, d_model]",
                tuple(self.values.shape),
            )

    def persona_position(
        self, name: str, *, param: str = "persona", func: str = "Centroids"
    ) -> int:
        """Returns the position of persona ``name``; a clear error lists the known names."""
        try:
            return self.personas.index(name)
        except ValueError:
            invalid(param, func, f"one of the persona names {list(self.personas)}", name)

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per persona and layer, with the centroid's L2 norm."""
        import pandas as pd

        norms = self.values.float().norm(dim=-1)
        return pd.DataFrame(
            [
                {"persona": p, "category": c, "layer": layer, "norm": norms[i, j].item()}
                for i, (p, c) in enumerate(zip(self.personas, self.categories, strict=True))
                for j, layer in enumerate(self.layers)
            ]
        )


def centroids(acts: ActivationSet, hook: str = "resid_post") -> Centroids:
    """Returns the per-persona, per-layer mean over questions of ``acts[hook]``.

    Means are taken in float32 (or float64 if the activations are float64), whatever the
    stored dtype, so that bf16 activations don't lose precision in the sum.
    """
    x = acts[hook]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return Centroids(
        values=x.to(dtype).mean(dim=1),
        personas=tuple(acts.personas.names),
        categories=tuple(acts.personas.categories),
        layers=tuple(acts.layers),
        hook=hook,
    )


class Centering:
    """Subtracts, per layer, the mean centroid of a centering set (fit/transform).

    Attributes (after ``fit``):
        mean_: ``[layer, d_model]``, the per-layer mean of the centering set's centroids.
        personas_: The names the mean was taken over.
        layers_: The layers it applies to.
    """

    def fit(self, reference: Centroids, personas: Sequence[str] | None = None) -> Centering:
        """Learns the per-layer mean of ``reference`` (restricted to ``personas`` if given)."""
        if personas is None:
            idx = list(range(len(reference.personas)))
        else:
            if len(personas) == 0:
                invalid(
                    "personas", "Centering.fit", "a non-empty list of persona names", list(personas)
                )
            idx = [
                reference.persona_position(n, param="personas", func="Centering.fit")
                for n in personas
            ]
        self.mean_: Float[Tensor, "layer d_model"] = reference.values[idx].mean(dim=0)
        self.personas_: tuple[str, ...] = tuple(reference.personas[i] for i in idx)
        self.layers_: tuple[int, ...] = reference.layers
        return self

    def transform(self, cents: Centroids) -> Centroids:
        """Returns ``cents`` minus the learned per-layer mean."""
        if not hasattr(self, "mean_"):
            raise RuntimeError("This Centering instance is not fitted yet. Call 'fit' first.")
        if cents.layers != self.layers_ or cents.values.shape[-1] != self.mean_.shape[-1]:
            invalid(
                "cents",
                "Centering.transform",
                f"centroids on layers {list(self.layers_)} with d_model={self.mean_.shape[-1]}",
                f"layers {list(cents.layers)}, d_model={cents.values.shape[-1]}",
            )
        return Centroids(
            values=cents.values - self.mean_.to(cents.values),
            personas=cents.personas,
            categories=cents.categories,
            layers=cents.layers,
            hook=cents.hook,
            centered_on=self.personas_,
        )


def center(cents: Centroids, centering: Centroids | Sequence[str] | None = None) -> Centroids:
    """Returns the centroids minus the per-layer mean of a centering set.

    Args:
        cents: The centroids to center.
        centering: None to center on ``cents`` itself (the personas being analysed), a list of
            persona names in ``cents`` to center on that subset, or another ``Centroids`` (e.g. a
            fixed, separate persona set) whose mean is subtracted.
    """
    if centering is None:
        return Centering().fit(cents).transform(cents)
    if isinstance(centering, Centroids):
        return Centering().fit(centering).transform(cents)
    if isinstance(centering, str):
        invalid(
            "centering",
            "center",
            "None, a list of persona names, or a Centroids",
            centering,
            exc=TypeError,
        )
    return Centering().fit(cents, list(centering)).transform(cents)


def _unit(x: Tensor, eps: float = 1e-12) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


@dataclass(frozen=True, kw_only=True)
class CosineToReference:
    """Cosine of each persona's centroid to the reference persona's, per layer.

    Attributes:
        values: ``[persona, layer]``; the reference's own row is 1 by construction.
    """

    values: Float[Tensor, "persona layer"]
    personas: tuple[str, ...]
    categories: tuple[str, ...]
    layers: tuple[int, ...]
    reference: str
    centered_on: tuple[str, ...] | None

    def at(self, layer: int) -> dict[str, float]:
        """Returns ``{persona: cosine}`` at block ``layer``."""
        if layer not in self.layers:
            invalid(
                "layer", "CosineToReference.at", f"one of the layers {list(self.layers)}", layer
            )
        j = self.layers.index(layer)
        return {p: self.values[i, j].item() for i, p in enumerate(self.personas)}

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per persona and layer: persona, category, layer, cosine."""
        import pandas as pd

        return pd.DataFrame(
            [
                {"persona": p, "category": c, "layer": layer, "cosine": self.values[i, j].item()}
                for i, (p, c) in enumerate(zip(self.personas, self.categories, strict=True))
                for j, layer in enumerate(self.layers)
            ]
        )

    def to_wide(self) -> pd.DataFrame:
        """Returns a persona × layer table of cosines."""
        import pandas as pd

        return pd.DataFrame(
            self.values.double().cpu().numpy(), index=list(self.personas), columns=list(self.layers)
        )


def cosine_to_reference(
    cents: Centroids, reference: str = "helpful_assistant"
) -> CosineToReference:
    """Returns the cosine of every persona's (centered) centroid to ``reference``'s, per layer.

    Pass centered centroids (``center(...)``) for the study's measure; on raw centroids every
    cosine is dominated by the shared mean direction and sits near 1.

    Raises:
        ValueError: If ``reference`` is not one of the personas.
    """
    r = cents.persona_position(reference, param="reference", func="cosine_to_reference")
    unit = _unit(cents.values)
    values = torch.einsum("pld,ld->pl", unit, unit[r])
    return CosineToReference(
        values=values,
        personas=cents.personas,
        categories=cents.categories,
        layers=cents.layers,
        reference=reference,
        centered_on=cents.centered_on,
    )


@dataclass(frozen=True, kw_only=True)
class PairwiseCosine:
    """Cosine between every pair of persona centroids, per layer: ``[layer, persona, persona]``."""

    values: Float[Tensor, "layer persona persona"]
    personas: tuple[str, ...]
    layers: tuple[int, ...]
    centered_on: tuple[str, ...] | None

    def at(self, layer: int) -> pd.DataFrame:
        """Returns the persona × persona cosine matrix at block ``layer``."""
        import pandas as pd

        if layer not in self.layers:
            invalid("layer", "PairwiseCosine.at", f"one of the layers {list(self.layers)}", layer)
        m = self.values[self.layers.index(layer)].double().cpu().numpy()
        return pd.DataFrame(m, index=list(self.personas), columns=list(self.personas))

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per layer and ordered persona pair: layer, persona_a/b, cosine."""
        import pandas as pd

        rows = []
        for k, layer in enumerate(self.layers):
            m = self.values[k]
            for i, a in enumerate(self.personas):
                for j, b in enumerate(self.personas):
                    rows.append(
                        {"layer": layer, "persona_a": a, "persona_b": b, "cosine": m[i, j].item()}
                    )
        return pd.DataFrame(rows)


def pairwise_cosine(cents: Centroids) -> PairwiseCosine:
    """Returns the cosine between every pair of (centered) persona centroids, per layer."""
    unit = _unit(cents.values)
    return PairwiseCosine(
        values=torch.einsum("pld,qld->lpq", unit, unit),
        personas=cents.personas,
        layers=cents.layers,
        centered_on=cents.centered_on,
    )
