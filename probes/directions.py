"""Directions in the residual stream, per layer, and projections of activations onto them.

A ``Direction`` holds one unit vector per layer (``[layer, d_model]``). The usual one is a
difference of means: the mean centroid of one group of personas minus the mean centroid of
another (``mean_difference``), or the assistant's centered centroid (``assistant_axis``).
``project`` gives the scalar coordinate of any activations (per prompt or per centroid) along it.

Centering follows ``persona_geometry.geometry``: a centering set's per-layer mean centroid is
subtracted first. A difference of means does not change under centering (the same vector is
subtracted from both groups); the assistant axis and projections do, so they take the same
``centering`` argument as ``center``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from persona_geometry._validation import invalid
from persona_geometry.activations import ActivationSet
from persona_geometry.geometry import Centering, Centroids, center, centroids

__all__ = ["Direction", "Projection", "mean_difference", "assistant_axis", "project"]

_VALUES_FILE = "direction.safetensors"
_META_FILE = "direction.json"


@dataclass(frozen=True, kw_only=True)
class Direction:
    """One direction per layer in the residual stream.

    Attributes:
        values: ``[layer, d_model]``; unit-norm rows unless built with ``normalize=False``.
        layers: Block indices along the first axis.
        description: What the direction is, e.g. ``"helpful_assistant - mean(others)"``.
        hook: The hook point the activations came from.
        positive: Persona names whose mean the direction points towards.
        negative: Persona names whose mean the direction points away from (may be empty).
        norms: ``[layer]``, the length of the raw difference before normalisation; a near-zero
            norm means the direction at that layer is mostly noise.
        model_id: The model the activations came from, when known (checked by ``steer``).
    """

    values: Float[Tensor, "layer d_model"]
    layers: tuple[int, ...]
    description: str
    hook: str = "resid_post"
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    norms: Float[Tensor, " layer"] | None = None
    model_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[0] != len(self.layers):
            invalid(
                "values",
                "Direction",
                f"a tensor shaped [layer={len(self.layers)}, d_model]",
                tuple(self.values.shape),
            )
        if len(set(self.layers)) != len(self.layers):
            invalid("layers", "Direction", "unique block indices", list(self.layers))
        if self.norms is not None and tuple(self.norms.shape) != (len(self.layers),):
            invalid(
                "norms",
                "Direction",
                f"a tensor shaped [layer={len(self.layers)}]",
                tuple(self.norms.shape),
            )

    @property
    def d_model(self) -> int:
        """The residual stream width the direction lives in."""
        return int(self.values.shape[-1])

    def at(self, layer: int, *, func: str = "Direction.at") -> Float[Tensor, " d_model"]:
        """Returns the direction's vector at block ``layer``.

        Raises:
            ValueError: If the direction has no vector at that layer.
        """
        return self.values[self.layer_position(layer, func=func)]

    def layer_position(self, layer: int, *, func: str = "Direction.layer_position") -> int:
        """Returns where block ``layer`` sits on the direction's layer axis."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            invalid(
                "layer",
                func,
                f"one of the direction's layers {list(self.layers)}",
                layer,
                exc=TypeError,
            )
        if layer not in self.layers:
            invalid("layer", func, f"one of the direction's layers {list(self.layers)}", layer)
        return self.layers.index(layer)

    def project(self, x: Float[Tensor, "*batch layer d_model"]) -> Float[Tensor, "*batch layer"]:
        """Returns the coordinate of ``x`` along the direction, per layer (``x @ direction``).

        ``x``'s layer axis must be this direction's layers, in order.
        """
        _check_width(x.shape[-1], self, "Direction.project", param="x")
        if x.shape[-2] != len(self.layers):
            invalid(
                "x",
                "Direction.project",
                f"a tensor whose layer axis has the direction's {len(self.layers)} layers",
                tuple(x.shape),
            )
        dtype = _float_dtype(x)
        return torch.einsum(
            "...ld,ld->...l", x.to(dtype), self.values.to(device=x.device, dtype=dtype)
        )

    def select(self, layers: Sequence[int]) -> Direction:
        """Returns the direction restricted to ``layers``, in that order."""
        idx = [self.layer_position(layer, func="Direction.select") for layer in layers]
        return Direction(
            values=self.values[idx],
            layers=tuple(self.layers[i] for i in idx),
            description=self.description,
            hook=self.hook,
            positive=self.positive,
            negative=self.negative,
            norms=None if self.norms is None else self.norms[idx],
            model_id=self.model_id,
            extra=dict(self.extra),
        )

    def cosine(self, other: Direction) -> Float[Tensor, " layer"]:
        """Returns the cosine between this direction and ``other`` at each of this one's layers."""
        _check_width(other.d_model, self, "Direction.cosine", param="other")
        o = torch.stack([other.at(layer, func="Direction.cosine") for layer in self.layers]).to(
            self.values
        )
        return torch.nn.functional.cosine_similarity(self.values, o, dim=-1)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict: metadata and the values as nested lists."""
        return {**self._meta(), "values": self.values.double().cpu().tolist()}

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per layer: layer, the raw difference's norm, the stored vector's norm."""
        vnorm = self.values.float().norm(dim=-1)
        return pd.DataFrame(
            {
                "layer": list(self.layers),
                "raw_norm": [float("nan")] * len(self.layers)
                if self.norms is None
                else self.norms.double().cpu().tolist(),
                "norm": vnorm.double().cpu().tolist(),
            }
        )

    def summary(self) -> str:
        """Returns a short text description of the direction."""
        lines = [
            f"Direction: {self.description}",
            f"  model: {self.model_id or 'unknown'}   hook: {self.hook}   d_model: {self.d_model}",
            f"  layers: {list(self.layers)}",
        ]
        if self.positive:
            lines.append(f"  towards: {', '.join(self.positive)}")
        if self.negative:
            lines.append(f"  away from: {', '.join(self.negative)}")
        if self.norms is not None:
            lines.append(
                "  raw norm per layer: "
                + ", ".join(
                    f"{layer}:{n:.3g}"
                    for layer, n in zip(self.layers, self.norms.tolist(), strict=True)
                )
            )
        return "\n".join(lines)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the direction to folder ``path`` (safetensors values + JSON metadata), atomically.

        Returns:
            The folder written.
        """
        from safetensors.torch import save_file

        from persona_geometry._io import atomic_dir
        from persona_geometry.provenance import package_versions

        tensors = {"values": self.values.detach().cpu().contiguous()}
        if self.norms is not None:
            tensors["norms"] = self.norms.detach().cpu().contiguous()
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / _VALUES_FILE))
            meta = {**self._meta(), "package_versions": package_versions()}
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Direction:
        """Returns the direction stored in folder ``path`` by ``save``.

        Raises:
            ValueError: If the folder does not hold a saved direction.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / _VALUES_FILE).is_file() or not (path / _META_FILE).is_file():
            invalid(
                "path",
                "Direction.load",
                f"a folder holding {_VALUES_FILE} and {_META_FILE}",
                str(path),
            )
        tensors = load_file(str(path / _VALUES_FILE))
        meta = json.loads((path / _META_FILE).read_text(encoding="utf-8"))
        return cls(
            values=tensors["values"],
            layers=tuple(meta["layers"]),
            description=meta["description"],
            hook=meta.get("hook", "resid_post"),
            positive=tuple(meta.get("positive", ())),
            negative=tuple(meta.get("negative", ())),
            norms=tensors.get("norms"),
            model_id=meta.get("model_id"),
            extra=meta.get("extra", {}),
        )

    def _meta(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "layers": list(self.layers),
            "d_model": self.d_model,
            "hook": self.hook,
            "positive": list(self.positive),
            "negative": list(self.negative),
            "norms": None if self.norms is None else self.norms.double().cpu().tolist(),
            "model_id": self.model_id,
            "extra": dict(self.extra),
        }


@dataclass(frozen=True, kw_only=True)
class Projection:
    """Coordinates of activations along a direction, per layer.

    Attributes:
        values: ``[persona, layer]`` for centroids, ``[persona, question, layer]`` per prompt.
        personas: Persona names along the first axis.
        categories: Their categories.
        layers: Block indices along the last axis.
        questions: The questions along the second axis when per prompt, else None.
        direction: The direction's description.
        centered_on: Names of the centering set, if the activations were centered first.
    """

    values: Float[Tensor, "persona *question layer"]
    personas: tuple[str, ...]
    categories: tuple[str, ...]
    layers: tuple[int, ...]
    questions: tuple[str, ...] | None
    direction: str
    centered_on: tuple[str, ...] | None = None

    @property
    def per_prompt(self) -> bool:
        """Whether there is one value per prompt (else one per persona centroid)."""
        return self.questions is not None

    def at(self, layer: int) -> dict[str, float]:
        """Returns ``{persona: projection}`` at block ``layer`` (means over questions)."""
        if layer not in self.layers:
            invalid("layer", "Projection.at", f"one of the layers {list(self.layers)}", layer)
        j = self.layers.index(layer)
        v = self.values[..., j]
        if self.per_prompt:
            v = v.mean(dim=1)
        return {p: v[i].item() for i, p in enumerate(self.personas)}

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per persona (and question, when per prompt) and layer."""
        v = self.values.double().cpu().numpy()
        rows = []
        for i, (p, c) in enumerate(zip(self.personas, self.categories, strict=True)):
            for j, layer in enumerate(self.layers):
                if self.per_prompt:
                    for q in range(v.shape[1]):
                        rows.append(
                            {
                                "persona": p,
                                "category": c,
                                "question_index": q,
                                "layer": layer,
                                "projection": v[i, q, j],
                            }
                        )
                else:
                    rows.append(
                        {"persona": p, "category": c, "layer": layer, "projection": v[i, j]}
                    )
        return pd.DataFrame(rows)

    def to_wide(self) -> pd.DataFrame:
        """Returns a persona × layer table (means over questions when per prompt)."""
        v = self.values.mean(dim=1) if self.per_prompt else self.values
        return pd.DataFrame(
            v.double().cpu().numpy(), index=list(self.personas), columns=list(self.layers)
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict of the labels and values."""
        return {
            "direction": self.direction,
            "personas": list(self.personas),
            "categories": list(self.categories),
            "layers": list(self.layers),
            "questions": None if self.questions is None else list(self.questions),
            "centered_on": None if self.centered_on is None else list(self.centered_on),
            "values": self.values.double().cpu().tolist(),
        }

    def summary(self) -> str:
        """Returns the persona × layer table of projections as text."""
        kind = "per prompt (mean over questions shown)" if self.per_prompt else "per centroid"
        centered = f", centered on {len(self.centered_on)} personas" if self.centered_on else ""
        return (
            f"Projection onto {self.direction} — {kind}{centered}\n"
            + self.to_wide().round(4).to_string()
        )


# --- building directions --------------------------------------------------------------------


def _as_centroids(
    x: ActivationSet | Centroids, hook: str, func: str, param: str = "acts"
) -> Centroids:
    if isinstance(x, Centroids):
        return x
    if isinstance(x, ActivationSet):
        if hook not in x.hooks:
            invalid("hook", func, f"one of the stored hooks {x.hooks}", hook)
        return centroids(x, hook)
    invalid(param, func, "an ActivationSet or a Centroids", type(x).__name__, exc=TypeError)


def _group(names: str | Sequence[str], cents: Centroids, param: str, func: str) -> list[int]:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        invalid(
            param, func, f"a non-empty list of persona names from {list(cents.personas)}", names
        )
    if len(set(names)) != len(names):
        invalid(param, func, "persona names without repeats", names)
    return [cents.persona_position(n, param=param, func=func) for n in names]


def _select_layers(cents: Centroids, layers: int | Sequence[int] | None, func: str) -> list[int]:
    if layers is None:
        return list(range(len(cents.layers)))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    idx = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer not in cents.layers:
            invalid(
                "layers",
                func,
                f"layers from the stored ones {list(cents.layers)}",
                layer,
                exc=ValueError if isinstance(layer, int) else TypeError,
            )
        idx.append(cents.layers.index(layer))
    if not idx:
        invalid(
            "layers", func, f"a non-empty list of layers from {list(cents.layers)}", list(layers)
        )
    return idx


def _normalised(raw: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    norms = raw.norm(dim=-1)
    if not normalize:
        return raw, norms
    return raw / norms.clamp_min(torch.finfo(raw.dtype).tiny).unsqueeze(-1), norms


def mean_difference(
    acts: ActivationSet | Centroids,
    positive: str | Sequence[str],
    negative: str | Sequence[str] | None = None,
    *,
    hook: str = "resid_post",
    layers: int | Sequence[int] | None = None,
    normalize: bool = True,
    description: str | None = None,
) -> Direction:
    """Returns the difference-of-means direction ``mean(positive) − mean(negative)`` per layer.

    Each persona's centroid (its mean over questions) counts once, so a group's mean is the
    mean of its members' centroids. Centering is irrelevant here: subtracting a centering
    set's mean from every centroid leaves the difference unchanged.

    Args:
        acts: Activations (centroids are taken at ``hook``) or centroids.
        positive: A persona name or names; the direction points towards their mean.
        negative: The other group; None means every persona not in ``positive``.
        hook: Which hook point of an ``ActivationSet`` to use.
        layers: Blocks to keep (all stored ones by default).
        normalize: Scale each layer's vector to unit length (default). The raw lengths are kept
            in ``Direction.norms`` either way.
        description: A label; by default built from the group names.

    Raises:
        ValueError: If a group is empty, names an unknown persona, or the groups overlap.
    """
    func = "mean_difference"
    cents = _as_centroids(acts, hook, func)
    pos = _group(positive, cents, "positive", func)
    if negative is None:
        neg = [i for i in range(len(cents.personas)) if i not in pos]
        if not neg:
            invalid(
                "negative",
                func,
                "a non-empty group; every persona is in 'positive', so the rest is empty",
                None,
            )
    else:
        neg = _group(negative, cents, "negative", func)
    overlap = sorted(set(pos) & set(neg))
    if overlap:
        invalid(
            "negative",
            func,
            "persona names not also in 'positive'",
            [cents.personas[i] for i in overlap],
        )
    lidx = _select_layers(cents, layers, func)
    v = cents.values[:, lidx]
    raw = v[pos].mean(dim=0) - v[neg].mean(dim=0)
    values, norms = _normalised(raw, normalize)
    pos_names = tuple(cents.personas[i] for i in pos)
    neg_names = tuple(cents.personas[i] for i in neg)
    if description is None:
        rest = "others" if negative is None else _label(neg_names)
        description = f"{_label(pos_names)} - mean({rest})"
    return Direction(
        values=values,
        layers=tuple(cents.layers[i] for i in lidx),
        description=description,
        hook=cents.hook,
        positive=pos_names,
        negative=neg_names,
        norms=norms,
        model_id=acts.manifest.get("model_id") if isinstance(acts, ActivationSet) else None,
    )


def _label(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else "mean(" + ", ".join(names) + ")"


def assistant_axis(
    acts: ActivationSet | Centroids,
    reference: str = "helpful_assistant",
    *,
    centering: None | Sequence[str] | Centroids | ActivationSet = None,
    hook: str = "resid_post",
    layers: int | Sequence[int] | None = None,
) -> Direction:
    """Returns the assistant axis: the reference's centered centroid, unit length, per layer.

    With the default centering (every persona in ``acts``, as ``center`` does) this is
    ``reference − mean(others)`` up to a positive factor. The centered cosine of the study is
    then ``project(center(cents), axis) / ‖centered centroid‖``, so the axis and
    ``cosine_to_reference`` agree by construction.

    Args:
        acts: Activations or centroids holding ``reference``.
        reference: The assistant persona's name.
        centering: As in ``persona_geometry.geometry.center``: None for the personas of
            ``acts``, a list of names among them, or another set's ``Centroids``/``ActivationSet``.
        hook: Which hook point of an ``ActivationSet`` to use.
        layers: Blocks to keep (all stored ones by default).

    Raises:
        ValueError: If ``reference`` is not a persona of ``acts``.
    """
    func = "assistant_axis"
    cents = _as_centroids(acts, hook, func)
    r = cents.persona_position(reference, param="reference", func=func)
    if isinstance(centering, ActivationSet):
        centering = _as_centroids(centering, hook, func, param="centering")
    centered = center(cents, centering)
    lidx = _select_layers(cents, layers, func)
    values, norms = _normalised(centered.values[r, lidx], True)
    on = centered.centered_on or ()
    others = tuple(n for n in on if n != reference)
    return Direction(
        values=values,
        layers=tuple(cents.layers[i] for i in lidx),
        description=f"assistant axis: {reference} centered on {len(on)} personas",
        hook=cents.hook,
        positive=(reference,),
        negative=others,
        norms=norms,
        model_id=acts.manifest.get("model_id") if isinstance(acts, ActivationSet) else None,
        extra={"centered_on": list(on)},
    )


# --- projections ----------------------------------------------------------------------------


def _check_width(width: int, direction: Direction, func: str, *, param: str = "direction") -> None:
    if width == direction.d_model:
        return
    if param == "direction":
        invalid(
            "direction",
            func,
            f"a direction of the activations' width d_model={width}",
            f"a direction with d_model={direction.d_model}",
        )
    invalid(
        param, func, f"of the direction's width d_model={direction.d_model}", f"d_model={width}"
    )


def _float_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fit_centering(centering: Any, cents: Centroids, hook: str, func: str) -> Centering | None:
    if centering is None:
        return None
    if isinstance(centering, Centering):
        if not hasattr(centering, "mean_"):
            invalid("centering", func, "a fitted Centering", "an unfitted Centering")
        return centering
    if isinstance(centering, ActivationSet):
        centering = _as_centroids(centering, hook, func, param="centering")
    if isinstance(centering, Centroids):
        return Centering().fit(centering)
    if centering == "all":
        return Centering().fit(cents)
    if isinstance(centering, str):
        invalid(
            "centering",
            func,
            "None, 'all', a list of persona names, a Centroids, an ActivationSet "
            "or a fitted Centering",
            centering,
        )
    try:
        return Centering().fit(cents, list(centering))
    except ValueError as e:
        raise ValueError(
            str(e).replace("Centering.fit", func).replace("'personas'", "'centering'")
        ) from e


def project(
    x: ActivationSet | Centroids,
    direction: Direction,
    *,
    hook: str = "resid_post",
    layers: int | Sequence[int] | None = None,
    centering: None | str | Sequence[str] | Centroids | ActivationSet | Centering = None,
) -> Projection:
    """Returns the coordinate of every prompt (or centroid) along ``direction``, per layer.

    Args:
        x: An ``ActivationSet`` (one value per prompt, ``[persona, question, layer]``) or
            ``Centroids`` (one per persona, ``[persona, layer]``).
        direction: The direction, e.g. from ``mean_difference`` or ``assistant_axis``.
        hook: Which hook point of an ``ActivationSet`` to project.
        layers: Blocks to project at; by default every direction layer that ``x`` also holds.
        centering: Subtract a centering set's per-layer mean centroid before projecting. None
            (default) projects as is; ``"all"`` centers on every persona in ``x`` (what
            ``center`` does by default); a list of persona names of ``x``; another set's
            ``Centroids`` or ``ActivationSet``; or a fitted ``Centering``.

    Raises:
        ValueError: If the direction's width differs from the activations', a requested layer
            is missing from either, or the two share no layer.
    """
    func = "project"
    if not isinstance(direction, Direction):
        invalid("direction", func, "a Direction", type(direction).__name__, exc=TypeError)
    if isinstance(x, ActivationSet):
        if hook not in x.hooks:
            invalid("hook", func, f"one of the stored hooks {x.hooks}", hook)
        data = x[hook]
        x_layers, personas, categories = (
            x.layers,
            tuple(x.personas.names),
            tuple(x.personas.categories),
        )
        questions: tuple[str, ...] | None = tuple(x.questions)
    elif isinstance(x, Centroids):
        data = x.values
        x_layers, personas, categories, questions = x.layers, x.personas, x.categories, None
    else:
        invalid("x", func, "an ActivationSet or a Centroids", type(x).__name__, exc=TypeError)
    _check_width(data.shape[-1], direction, func)

    if layers is None:
        use = [layer for layer in direction.layers if layer in x_layers]
        if not use:
            invalid(
                "direction",
                func,
                f"a direction with at least one of the activations' layers {list(x_layers)}",
                list(direction.layers),
            )
    else:
        use = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
        if not use:
            invalid("layers", func, "a non-empty list of layers", use)
        both = sorted(set(direction.layers) & set(x_layers))
        for layer in use:
            if isinstance(layer, bool) or not isinstance(layer, int):
                invalid(
                    "layers",
                    func,
                    f"ints among the layers held by both the activations and the direction {both}",
                    layer,
                    exc=TypeError,
                )
            if layer not in both:
                invalid(
                    "layers",
                    func,
                    f"layers held by both the activations and the direction {both}",
                    layer,
                )

    xidx = [x_layers.index(layer) for layer in use]
    data = data[..., xidx, :]
    dtype = _float_dtype(data)
    data = data.to(dtype)
    centered_on = None
    fitted = None
    if centering is not None:
        fitted = _fit_centering(
            centering, x if isinstance(x, Centroids) else centroids(x, hook), hook, func
        )
    if fitted is not None:
        if fitted.mean_.shape[-1] != data.shape[-1] or not set(use) <= set(fitted.layers_):
            invalid(
                "centering",
                func,
                f"a centering set with layers {use} and d_model={data.shape[-1]}",
                f"layers {list(fitted.layers_)}, d_model={fitted.mean_.shape[-1]}",
            )
        mean = fitted.mean_[[fitted.layers_.index(layer) for layer in use]].to(data)
        data = data - mean
        centered_on = fitted.personas_
    values = direction.select(use).project(data)
    return Projection(
        values=values,
        personas=personas,
        categories=categories,
        layers=tuple(use),
        questions=questions,
        direction=direction.description,
        centered_on=centered_on,
    )
