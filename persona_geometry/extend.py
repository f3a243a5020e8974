"""Follow-ups on a cached ``ActivationSet`` without redoing what is already cached.

``extend`` adds personas and/or questions: only the new prompts run through the model (new
personas on every question, old personas on the new questions), after checking that the model
and chat template are the ones the cache was made with. ``recenter`` recomputes centroids,
centering and cosines with another centering set, with no model at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from persona_geometry._validation import invalid
from persona_geometry.activations import ActivationSet
from persona_geometry.geometry import (
    Centroids,
    CosineToReference,
    center,
    centroids,
    cosine_to_reference,
)
from persona_geometry.personas import Persona, PersonaSet

__all__ = ["extend", "recenter", "concat_personas", "concat_questions"]

log = logging.getLogger(__name__)

# Manifest entries (as ``extract_activations`` writes them) that must agree for two activation
# sets to be comparable: same weights, same numerics, same prompt rendering. The device is not
# among them (CPU and GPU float32 agree to ~1e-6). Only keys both manifests carry are compared.
_IDENTITY_KEYS = (
    "model_id",
    "revision",
    "weights_id",
    "adapter",
    "dtype",
    "engine",
    "n_layers",
    "chat_template_hash",
)


def _check_same_source(
    old: Mapping[str, Any], new: Mapping[str, Any], param: str, func: str
) -> None:
    """Raises if two manifests disagree on any identity key they both carry."""
    diffs = {
        k: (old[k], new[k]) for k in _IDENTITY_KEYS if k in old and k in new and old[k] != new[k]
    }
    if diffs:
        detail = "; ".join(f"{k}: cached {a!r} vs {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(
            f"The {param!r} parameter of {func} must produce activations from the same model, "
            f"dtype and chat template as the cached set. Got a mismatch instead ({detail})."
        )


def _model_identity(model: Any, chat_template: str | None) -> dict[str, Any]:
    """Returns the handle's identity under manifest key names, known before running the model."""
    from persona_geometry.prompts import chat_template_of
    from persona_geometry.provenance import stable_hash

    out: dict[str, Any] = {}
    provenance = getattr(model, "provenance", None)
    if callable(provenance):
        out.update({k: v for k, v in provenance().items() if k in _IDENTITY_KEYS})
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        out["chat_template_hash"] = stable_hash(
            chat_template_of(tokenizer, chat_template, func="extend")
        )
    return out


def _extended_manifest(
    acts: ActivationSet, model: Any, chat_template: str | None, parts: list[Mapping[str, Any]]
) -> dict[str, Any]:
    """Returns the cached manifest with the content hashes of the grown set.

    The hashes are those a full extraction of the union would record, so the extended set's
    cache key is that extraction's: it can be stored in, and found from, the same cache.
    """
    from persona_geometry.prompts import render_prompts
    from persona_geometry.provenance import stable_hash

    manifest = dict(acts.manifest)
    tokenizer = getattr(model, "tokenizer", None)
    manifest["persona_hash"] = acts.personas.content_hash()
    manifest["question_hash"] = stable_hash(list(acts.questions))
    manifest["n_prompts"] = len(acts.personas) * len(acts.questions)
    if tokenizer is not None:
        prompts = render_prompts(
            tokenizer, acts.personas, acts.questions, chat_template=chat_template
        )
        manifest["prompt_ids_hash"] = prompts.content_hash()
    if "cache_key" in manifest:
        from persona_geometry.store import KEY_FIELDS, cache_key

        if all(k in manifest for k in KEY_FIELDS):
            manifest["extended_from"] = acts.manifest.get(
                "extended_from", acts.manifest["cache_key"]
            )
            manifest["cache_key"] = cache_key(manifest)
    manifest["extensions"] = [
        *acts.manifest.get("extensions", []),
        *(
            {
                "cache_key": p.get("cache_key"),
                "created": p.get("created"),
                "n_prompts": p.get("n_prompts"),
            }
            for p in parts
        ),
    ]
    return manifest


def _as_personas(personas: Sequence[Persona] | PersonaSet | None) -> list[Persona]:
    if personas is None:
        return []
    if isinstance(personas, Persona):
        return [personas]
    out = list(personas)
    for p in out:
        if not isinstance(p, Persona):
            invalid("personas", "extend", "a sequence of Persona objects", p, exc=TypeError)
    return out


def concat_personas(a: ActivationSet, b: ActivationSet) -> ActivationSet:
    """Returns ``a`` with ``b``'s personas appended (same questions, layers and hooks, in order).

    Raises:
        ValueError: If the questions, layers, hooks or model differ, or a persona is in both.
    """
    func = "concat_personas"
    _check_joinable(a, b, func, same_questions=True, same_personas=False)
    overlap = [n for n in b.personas.names if n in a.personas]
    if overlap:
        invalid("b", func, "personas not already in 'a'", overlap)
    return ActivationSet(
        {h: torch.cat([a[h], b[h].to(a[h])], dim=0) for h in a.hooks},
        personas=a.personas + b.personas,
        questions=a.questions,
        layers=a.layers,
        n_tokens=torch.cat([a.n_tokens, b.n_tokens], dim=0),
        manifest=a.manifest,
    )


def concat_questions(a: ActivationSet, b: ActivationSet) -> ActivationSet:
    """Returns ``a`` with ``b``'s questions appended (same personas, layers and hooks, in order).

    Raises:
        ValueError: If the personas, layers, hooks or model differ, or a question is in both.
    """
    func = "concat_questions"
    _check_joinable(a, b, func, same_questions=False, same_personas=True)
    overlap = [q for q in b.questions if q in a.questions]
    if overlap:
        invalid("b", func, "questions not already in 'a'", overlap)
    return ActivationSet(
        {h: torch.cat([a[h], b[h].to(a[h])], dim=1) for h in a.hooks},
        personas=a.personas,
        questions=[*a.questions, *b.questions],
        layers=a.layers,
        n_tokens=torch.cat([a.n_tokens, b.n_tokens], dim=1),
        manifest=a.manifest,
    )


def _check_joinable(
    a: ActivationSet, b: ActivationSet, func: str, *, same_questions: bool, same_personas: bool
) -> None:
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, ActivationSet):
            invalid(name, func, "an ActivationSet", type(x).__name__, exc=TypeError)
    if b.layers != a.layers:
        invalid(
            "b", func, f"activations on the same layers as 'a' {list(a.layers)}", list(b.layers)
        )
    if sorted(b.hooks) != sorted(a.hooks):
        invalid("b", func, f"activations at the same hooks as 'a' {a.hooks}", b.hooks)
    if b.d_model != a.d_model:
        invalid(
            "b",
            func,
            f"activations of the same width as 'a' (d_model={a.d_model})",
            f"d_model={b.d_model}",
        )
    if same_questions and b.questions != a.questions:
        invalid(
            "b",
            func,
            "activations on the same questions as 'a', in the same order",
            list(b.questions),
        )
    if same_personas and b.personas != a.personas:
        invalid(
            "b",
            func,
            f"activations of the same personas as 'a' {a.personas.names}",
            b.personas.names,
        )
    _check_same_source(a.manifest, b.manifest, "b", func)


def extend(
    acts: ActivationSet,
    model: Any,
    *,
    personas: Sequence[Persona] | PersonaSet | None = None,
    questions: Sequence[str] | None = None,
    chat_template: str | None = None,
    **extract_kwargs: Any,
) -> ActivationSet:
    """Returns ``acts`` grown by new personas and/or questions, running only the new prompts.

    New personas are run on every question (cached and new); cached personas only on the new
    questions. The result equals a full extraction of the union (new personas last, new
    questions last), up to batching noise.

    Args:
        acts: The cached activations.
        model: The ``ModelHandle`` (from ``load_model``) the cache was made with, or its folder or
            id (then loaded once, in the cached dtype).
        personas: Personas to add; none may already be cached.
        questions: Questions to add; none may already be cached.
        chat_template: The template override the cache was made with, if any.
        **extract_kwargs: Passed to ``extract_activations`` (e.g. ``batch_tokens``); hooks and
            layers always follow the cache.

    Raises:
        ValueError: If nothing is added, something added is already cached, or the model,
            dtype or chat template differ from the cache's manifest (checked before running
            the model where the handle tells, and again on the new activations' manifest).
    """
    from persona_geometry.extract import extract_activations

    func = "extend"
    if not isinstance(acts, ActivationSet):
        invalid("acts", func, "an ActivationSet", type(acts).__name__, exc=TypeError)
    new_personas = _as_personas(personas)
    new_questions = [] if questions is None else list(questions)
    if isinstance(questions, str):
        invalid("questions", func, "a list of question strings", questions, exc=TypeError)
    if not new_personas and not new_questions:
        invalid("personas", func, "a non-empty list of personas (or pass questions)", [])
    dup_p = [p.name for p in new_personas if p.name in acts.personas]
    if dup_p:
        invalid("personas", func, "personas not already in the cached set", dup_p)
    dup_q = [q for q in new_questions if q in acts.questions]
    if dup_q:
        invalid("questions", func, "questions not already in the cached set", dup_q)
    for key in ("hooks", "layers"):
        if key in extract_kwargs:
            invalid(key, func, "left out (the cached set's are used)", extract_kwargs[key])
    if chat_template is not None:
        extract_kwargs["chat_template"] = chat_template
    if isinstance(model, str | os.PathLike):
        from persona_geometry.models import load_model

        # Loaded once for both parts, in the cached set's dtype.
        model = load_model(
            model, dtype=acts.manifest.get("dtype"), device=extract_kwargs.pop("device", None)
        )
        extract_kwargs.pop("dtype", None)
    _check_same_source(acts.manifest, _model_identity(model, chat_template), "model", func)

    kwargs = {"hooks": tuple(acts.hooks), "layers": list(acts.layers), **extract_kwargs}
    for key in ("engine", "layer_template"):
        if acts.manifest.get(key) is not None and key not in kwargs:
            kwargs[key] = acts.manifest[key]
    out = acts
    parts = []
    if new_questions:
        log.info(
            "extracting %d cached personas × %d new questions",
            len(acts.personas),
            len(new_questions),
        )
        part = extract_activations(model, acts.personas, new_questions, **kwargs)
        _check_same_source(acts.manifest, part.manifest, "model", func)
        out = concat_questions(out, part)
        parts.append(part.manifest)
    if new_personas:
        all_questions = [*acts.questions, *new_questions]
        log.info("extracting %d new personas × %d questions", len(new_personas), len(all_questions))
        part = extract_activations(model, PersonaSet(new_personas), all_questions, **kwargs)
        _check_same_source(acts.manifest, part.manifest, "model", func)
        out = concat_personas(out, part)
        parts.append(part.manifest)
    return ActivationSet(
        {h: out[h] for h in out.hooks},
        personas=out.personas,
        questions=out.questions,
        layers=out.layers,
        n_tokens=out.n_tokens,
        manifest=_extended_manifest(out, model, chat_template, parts),
    )


def recenter(
    acts: ActivationSet | Centroids,
    centering: None | Sequence[str] | Centroids | ActivationSet = None,
    *,
    reference: str = "helpful_assistant",
    hook: str = "resid_post",
) -> CosineToReference:
    """Returns the cosine to ``reference`` per layer, centered on another set; no model needed.

    This is ``cosine_to_reference(center(centroids(acts), centering), reference)`` with one
    addition: a centering ``ActivationSet`` is checked to come from the same model and layers.

    Args:
        acts: The cached activations (or their centroids).
        centering: As in ``center``: None for the personas of ``acts``, a list of persona names
            among them, or another set (``Centroids`` or a cached ``ActivationSet``).
        reference: The persona every cosine is taken to.
        hook: Which hook point of an ``ActivationSet`` to use.

    Raises:
        ValueError: If the centering set comes from another model or has other layers or width.
    """
    func = "recenter"
    cents = acts if isinstance(acts, Centroids) else centroids(acts, hook)
    if isinstance(centering, ActivationSet):
        if isinstance(acts, ActivationSet):
            _check_same_source(acts.manifest, centering.manifest, "centering", func)
        centering = centroids(centering, hook)
    if isinstance(centering, Centroids):
        if centering.layers != cents.layers or centering.values.shape[-1] != cents.values.shape[-1]:
            invalid(
                "centering",
                func,
                f"a set on layers {list(cents.layers)} with d_model={cents.values.shape[-1]}",
                f"layers {list(centering.layers)}, d_model={centering.values.shape[-1]}",
            )
    return cosine_to_reference(center(cents, centering), reference=reference)
