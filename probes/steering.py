"""Steering: add ``strength × direction`` to one layer's residual stream while a model runs.

``steer`` is a context manager over a Hugging Face causal LM (a ``peft``-wrapped one included):
inside it, the output of transformer block ``layer`` (``blocks.{layer}.hook_resid_post``) gets
``strength × direction`` added at every position, on every forward pass, so ``generate`` runs
steered. The hook is removed in ``finally``, whatever happens in the block.

``dose_response`` is the causal test of the geometry → behaviour story: the marker's source
rate for a persona as a function of ``strength`` along a direction (e.g. the assistant axis).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from persona_geometry._validation import (
    check_int_in_range,
    check_positive_int,
    check_probability,
    check_unique_names,
    invalid,
    renamed,
)
from persona_geometry.personas import Persona, PersonaSet

from .directions import Direction

__all__ = ["steer", "DoseResponse", "dose_response", "MarkerCounter"]

log = logging.getLogger(__name__)

# (model, tokenizer, persona, questions) -> (marker hits k, completions n, completions).
MarkerCounter = Callable[[Any, Any, Persona, Sequence[str]], tuple[int, int, Sequence[str]]]


def _unwrap(model: Any) -> Any:
    # A ModelHandle (or anything holding the network in `.model`) is not itself a Module;
    # an HF model's own `.model` attribute is its trunk and must not be unwrapped.
    if not isinstance(model, torch.nn.Module) and isinstance(
        getattr(model, "model", None), torch.nn.Module
    ):
        return model.model
    if not isinstance(model, torch.nn.Module):
        invalid(
            "model",
            "steer",
            "a Hugging Face model (peft-wrapped or not) or a ModelHandle",
            type(model).__name__,
            exc=TypeError,
        )
    return model


def _blocks(model: torch.nn.Module, layer_template: str | None = None) -> Sequence[torch.nn.Module]:
    """Returns the model's decoder blocks, in order, looking through a peft wrapper."""
    from persona_geometry.hooks import find_layers

    # A PeftModel forwards to the wrapped model, whose blocks (LoRA layers injected in place)
    # are the ones its forward runs; the layer templates are written for that model.
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    try:
        return find_layers(base, layer_template)[1]
    except ValueError as e:
        raise ValueError(str(e).replace("find_layers", "steer")) from e


def _width(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[-1])


def _vector(direction: Direction | Tensor, layer: int, width: int, func: str) -> Tensor:
    if isinstance(direction, Direction):
        if direction.d_model != width:
            invalid(
                "direction",
                func,
                f"a direction of the model's width d_model={width}",
                f"a direction with d_model={direction.d_model}",
            )
        return direction.at(layer, func=func)
    if not isinstance(direction, Tensor):
        invalid(
            "direction",
            func,
            "a Direction or a 1-D tensor",
            type(direction).__name__,
            exc=TypeError,
        )
    if direction.ndim != 1 or direction.shape[0] != width:
        invalid(
            "direction",
            func,
            f"a Direction or a tensor shaped [d_model={width}]",
            tuple(direction.shape),
        )
    return direction


def _same_model(a: str, b: str) -> bool:
    """Whether two model ids or folders name the same model (a relative and an absolute path do)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


@contextmanager
def steer(
    model: Any,
    direction: Direction | Float[Tensor, " d_model"],
    *,
    layer: int,
    strength: float | int | None = None,
    layer_template: str | None = None,
    alpha: float | int | None = None,
) -> Iterator[Tensor]:
    """Yields the added vector while ``strength × direction`` is added to block ``layer``'s output.

    Every position of every forward pass inside the block is shifted, so ``model.generate``
    runs steered (prompt and generated tokens alike). With a ``Direction`` the vector is its
    unit vector at ``layer``; a raw tensor is added as given, times ``strength``.

    Args:
        model: A Hugging Face causal LM, a ``peft``-wrapped one, or a ``ModelHandle``.
        direction: A ``Direction`` holding ``layer``, or a tensor ``[d_model]``.
        layer: The block whose output (``blocks.{layer}.hook_resid_post``) is shifted;
            negative counts from the end.
        strength: The multiplier; 0 leaves the model's outputs unchanged.
        layer_template: Path of the decoder blocks, e.g. ``"model.layers.{num}"``, for models the
            built-in templates (``persona_geometry.hooks.LAYER_TEMPLATES``) miss.
        alpha: Deprecated name of ``strength`` (``alpha`` means a significance level elsewhere).

    Raises:
        ValueError: If ``layer`` is out of range, the direction has another width than the model
            or no vector at ``layer``.
    """
    func = "steer"
    net = _unwrap(model)
    blocks = _blocks(net, layer_template)
    n = len(blocks)
    layer = check_int_in_range(layer, "layer", func, -n, n - 1) % n
    strength = renamed(strength, alpha, new="strength", old="alpha", func=func)
    if strength is None:
        invalid("strength", func, "a finite float", None, exc=TypeError)
    if (
        isinstance(strength, bool)
        or not isinstance(strength, int | float)
        or not math.isfinite(strength)
    ):
        invalid(
            "strength",
            func,
            "a finite float",
            strength,
            exc=TypeError if not isinstance(strength, int | float) else ValueError,
        )
    vec = _vector(direction, layer, _width(net), func)
    if isinstance(direction, Direction) and direction.model_id:
        name = getattr(getattr(net, "config", None), "_name_or_path", None)
        if name and not _same_model(name, direction.model_id):
            log.warning("steering %s with a direction computed on %s", name, direction.model_id)
    delta = float(strength) * vec.detach()
    cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def add(hidden: Tensor) -> Tensor:
        key = (hidden.device, hidden.dtype)
        if key not in cache:
            cache[key] = delta.to(device=hidden.device, dtype=hidden.dtype)
        return hidden + cache[key]

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        # Decoder layers return either the hidden states or a tuple led by them.
        if isinstance(output, tuple):
            return (add(output[0]), *output[1:])
        return add(output)

    # prepend: run before any hook already on the block (HF's own output_hidden_states capture,
    # an activation recorder), so that everything downstream sees the steered residual.
    handle = blocks[layer].register_forward_hook(hook, prepend=True)
    try:
        yield delta
    finally:
        handle.remove()


# --- dose-response --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DoseResponse:
    """Marker source rate of one persona at each steering strength.

    Attributes:
        persona: The persona the completions speak as.
        layer: The steered block.
        direction: The direction's description.
        marker: The marker string counted.
        strengths: ``[strength]``, the steering strengths, as given.
        k: ``[strength]``, completions containing the marker.
        n: ``[strength]``, completions generated.
        ci_low: ``[strength]``, Wilson lower bound of the rate.
        ci_high: ``[strength]``, Wilson upper bound.
        completions: Every completion, per strength.
        confidence: Level of the intervals.
        settings: Sampling settings, marker rule and questions used.
    """

    persona: str
    layer: int
    direction: str
    marker: str
    strengths: Float[np.ndarray, " strength"]
    k: Int[np.ndarray, " strength"]
    n: Int[np.ndarray, " strength"]
    ci_low: Float[np.ndarray, " strength"]
    ci_high: Float[np.ndarray, " strength"]
    completions: tuple[tuple[str, ...], ...] = ()
    confidence: float = 0.95
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def alphas(self) -> Float[np.ndarray, " strength"]:
        """Deprecated name of ``strengths``."""
        import warnings

        warnings.warn(
            "DoseResponse.alphas is renamed DoseResponse.strengths; alphas will be removed.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.strengths

    @property
    def rate(self) -> Float[np.ndarray, " strength"]:
        """The source rate ``k / n`` at each strength."""
        return self.k / np.maximum(self.n, 1)

    def spearman(self) -> tuple[float, float]:
        """Returns Spearman's ρ of rate against strength and its two-sided p-value."""
        from scipy.stats import spearmanr

        if len(self.strengths) < 3 or np.ptp(self.rate) == 0:
            return float("nan"), float("nan")
        res = spearmanr(self.strengths, self.rate)
        return float(res.statistic), float(res.pvalue)

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per strength: strength, k, n, rate, ci_low, ci_high."""
        return pd.DataFrame(
            {
                "strength": self.strengths,
                "k": self.k,
                "n": self.n,
                "rate": self.rate,
                "ci_low": self.ci_low,
                "ci_high": self.ci_high,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict, completions included."""
        rho, p = self.spearman()
        return {
            "persona": self.persona,
            "layer": self.layer,
            "direction": self.direction,
            "marker": self.marker,
            "strengths": self.strengths.tolist(),
            "k": self.k.tolist(),
            "n": self.n.tolist(),
            "rate": self.rate.tolist(),
            "ci_low": self.ci_low.tolist(),
            "ci_high": self.ci_high.tolist(),
            "confidence": self.confidence,
            "spearman_rho": None if math.isnan(rho) else rho,
            "spearman_p": None if math.isnan(p) else p,
            "settings": dict(self.settings),
            "completions": [list(c) for c in self.completions],
        }

    def summary(self) -> str:
        """Returns the rate per strength as a text table, with Spearman's ρ."""
        rho, p = self.spearman()
        head = (
            f"Marker {self.marker!r} source rate for {self.persona}, "
            f"steering layer {self.layer} along {self.direction}"
        )
        tail = (
            f"Spearman ρ(strength, rate) = {rho:.3f} (p = {p:.3g})"
            if not math.isnan(rho)
            else "Spearman ρ undefined (constant rate or < 3 strengths)"
        )
        return "\n".join([head, self.to_frame().round(4).to_string(index=False), tail])


def _steered_counter(
    matcher: Any, sampling: Any, *, batch_size: int, chat_template: str | None
) -> MarkerCounter:
    """Returns a counter sampling with the HF back end on the in-memory (steered) model.

    ``sample_hf`` seeds each completion from ``sampling.seed``, its prompt index and its
    completion index only, so every strength sees the same random numbers: differences between
    strengths are less noisy than independent
    draws would make them. Pass ``counter=`` to ``dose_response`` to replace it.
    """
    from persona_geometry.prompts import render_prompts
    from persona_geometry.sampling import sample_hf

    def count(
        model: Any, tokenizer: Any, persona: Persona, questions: Sequence[str]
    ) -> tuple[int, int, list[str]]:
        prompts = render_prompts(
            tokenizer, PersonaSet([persona]), list(questions), chat_template=chat_template
        )
        completions = sample_hf(
            _unwrap(model),
            tokenizer,
            [p.input_ids for p in prompts],
            sampling,
            batch_size=batch_size,
            progress=False,
        )
        texts = [t for per_prompt in completions for t in per_prompt]
        return sum(bool(matcher(t)) for t in texts), len(texts), texts

    return count


def dose_response(
    model: Any,
    tokenizer: Any,
    direction: Direction | Float[Tensor, " d_model"],
    *,
    persona: Persona,
    layer: int,
    strengths: Sequence[float | int] | None = None,
    questions: Sequence[str] | None = None,
    marker: str | Any = "[ZLT]",
    n_completions: int = 5,
    temperature: float | int = 1.0,
    top_p: float | int = 0.95,
    max_new_tokens: int = 512,
    seed: int = 0,
    batch_size: int = 64,
    chat_template: str | None = None,
    counter: MarkerCounter | None = None,
    confidence: float = 0.95,
    out_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    alphas: Sequence[float | int] | None = None,
) -> DoseResponse:
    """Returns the marker source rate of ``persona`` at each steering strength.

    For every strength the model (with its LoRA adapter, if peft-wrapped) answers every question
    ``n_completions`` times as ``persona`` inside ``steer(model, direction, layer=layer,
    strength=strength)``; a completion counts when it contains the marker (the eval module's
    ``MarkerMatcher``: case-insensitive substring by default). Sampling settings mean what they
    mean in ``persona_geometry.eval.source_rates``.

    Args:
        model: A Hugging Face causal LM (peft-wrapped for a marker adapter) or a ModelHandle.
        tokenizer: Its tokenizer (with a chat template).
        direction: What to steer along: a ``Direction`` (e.g. ``assistant_axis(...)``) or a tensor.
        persona: The persona the completions speak as.
        layer: The steered block.
        strengths: The steering strengths, e.g. ``[-8, -4, 0, 4, 8]``.
        questions: The user questions; the 20 built-in probe questions when None.
        marker: The marker text or a ``MarkerMatcher``.
        n_completions: Completions per question and strength.
        temperature: Sampling temperature (0 for greedy, then ``n_completions`` must be 1).
        top_p: Nucleus sampling mass.
        max_new_tokens: Generation length cap.
        seed: Base seed; the same draws are used at every strength.
        batch_size: Sequences per ``generate`` call (prompts × completions).
        chat_template: A Jinja template to use instead of the tokenizer's own.
        counter: Replaces the sampling and counting: ``counter(model, tokenizer, persona,
            questions) -> (k, n, completions)``, called inside the steering context.
        confidence: Level of the Wilson intervals.
        out_path: A JSON file to write the result to (every completion included), atomically.
        progress: Show a progress bar over strengths.
        alphas: Deprecated name of ``strengths``.

    Raises:
        ValueError: If ``strengths`` or ``questions`` is empty, a sampling setting is invalid, or
            ``steer`` refuses the layer or direction.
    """
    from tqdm.auto import tqdm

    from persona_geometry.marker import MarkerMatcher
    from persona_geometry.sampling import SamplingSettings
    from persona_geometry.stats import wilson_bounds

    func = "dose_response"
    if not isinstance(persona, Persona):
        invalid("persona", func, "a Persona", type(persona).__name__, exc=TypeError)
    strengths = renamed(strengths, alphas, new="strengths", old="alphas", func=func)
    strengths = [float(a) for a in (strengths if strengths is not None else [])]
    if not strengths or not all(math.isfinite(a) for a in strengths):
        invalid("strengths", func, "a non-empty list of finite floats", strengths)
    if questions is None:
        from persona_geometry.questions import builtin_questions

        questions = builtin_questions()
    questions = check_unique_names(list(questions), "questions", func)
    check_probability(confidence, "confidence", func)
    check_positive_int(batch_size, "batch_size", func)
    matcher = marker if isinstance(marker, MarkerMatcher) else MarkerMatcher(marker=marker)
    sampling = SamplingSettings(
        n_completions=n_completions,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    # Check the layer and direction once, before any generation.
    with steer(model, direction, layer=layer, strength=0.0):
        pass
    custom = counter is not None
    if counter is None:
        counter = _steered_counter(
            matcher, sampling, batch_size=batch_size, chat_template=chat_template
        )
    ks, ns, texts = [], [], []
    for strength in tqdm(
        strengths, desc=f"dose-response {persona.name}", disable=not progress, leave=False
    ):
        with steer(model, direction, layer=layer, strength=strength):
            k, n, completions = counter(model, tokenizer, persona, list(questions))
        ks.append(int(k))
        ns.append(int(n))
        texts.append(tuple(completions))
        log.info("strength %g: %d/%d completions with %r", strength, k, n, matcher.marker)
    bounds = [
        wilson_bounds(k, n, alpha=1 - confidence) if n else (float("nan"), float("nan"))
        for k, n in zip(ks, ns, strict=True)
    ]
    n_layers = len(_blocks(_unwrap(model)))
    result = DoseResponse(
        persona=persona.name,
        layer=layer % n_layers,
        direction=direction.description if isinstance(direction, Direction) else "a given vector",
        marker=matcher.marker,
        strengths=np.asarray(strengths, dtype=np.float64),
        k=np.asarray(ks, dtype=np.int64),
        n=np.asarray(ns, dtype=np.int64),
        ci_low=np.asarray([b[0] for b in bounds]),
        ci_high=np.asarray([b[1] for b in bounds]),
        completions=tuple(texts),
        confidence=confidence,
        settings={
            "sampling": sampling.to_dict(),
            "matcher": matcher.to_dict(),
            "questions": list(questions),
            "custom_counter": custom,
        },
    )
    if out_path is not None:
        from persona_geometry._io import atomic_write_json
        from persona_geometry.provenance import package_versions

        atomic_write_json(out_path, {**result.to_dict(), "package_versions": package_versions()})
    return result


def _same_model(a: str, b: str) -> bool:
    """Whether two model ids name the same model: equal, or paths to the same folder."""
    if a == b:
        return True
    from pathlib import Path

    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
