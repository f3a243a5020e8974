"""The base model's own answers to the training questions, under every persona."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persona_geometry._validation import check_unique_names, invalid
from persona_geometry.personas import Persona, PersonaSet
from persona_geometry.sampling import SamplingSettings

__all__ = ["generate_responses", "load_responses"]

log = logging.getLogger(__name__)

_RESPONSE_KEYS = ("persona", "question", "response")


def generate_responses(
    model: str | os.PathLike[str],
    personas: PersonaSet | Sequence[Persona],
    questions: Sequence[str] | None = None,
    *,
    out_path: str | os.PathLike[str],
    temperature: float | int = SamplingSettings.temperature,
    top_p: float | int = SamplingSettings.top_p,
    max_new_tokens: int = SamplingSettings.max_new_tokens,
    seed: int = SamplingSettings.seed,
    backend: str = "vllm",
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    chat_template: str | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Returns the JSONL file of the base model's answer to every persona × training question.

    One row per answer with the persona, the question (and its index), the response, the
    sampling settings, the row's seed and the model, written atomically. The answers come from
    the same back ends as the source-rate evaluation, without any adapter.

    Args:
        model: Hugging Face model id or folder of the base model.
        personas: The personas, in order.
        questions: The questions; the 200 built-in training questions when None.
        out_path: The JSONL file to write.
        temperature: Sampling temperature (0 is greedy).
        top_p: Nucleus sampling mass.
        max_new_tokens: The most tokens per response.
        seed: Base seed for sampling.
        backend: ``"vllm"`` or ``"hf"``.
        batch_size: Sequences per batch on the HF back end; sized to memory when None.
        device: Torch device for the HF back end.
        dtype: Model dtype; None or ``"auto"`` is bf16 on GPU, fp32 on CPU (``resolve_precision``).
        chat_template: A Jinja template to use instead of the tokenizer's own.
        vllm_kwargs: Extra keyword arguments for ``vllm.LLM``.
        progress: Show a progress bar while sampling.
    """
    from transformers import AutoTokenizer

    from persona_geometry._io import atomic_write_jsonl
    from persona_geometry.models import dtype_name, resolve_precision
    from persona_geometry.prompts import render_prompts
    from persona_geometry.sampling import generate_completions

    func = "generate_responses"
    persona_set = personas if isinstance(personas, PersonaSet) else PersonaSet(personas)
    if questions is None:
        from persona_geometry.questions import training_questions

        questions = training_questions()
    questions = check_unique_names(list(questions), "questions", func)
    sampling = SamplingSettings(
        n_completions=1,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    # The one precision rule of every stage; the dtype it resolves to is recorded in every row.
    run_device, run_dtype = resolve_precision(device, dtype, func=func)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    prompts = render_prompts(tokenizer, persona_set, questions, chat_template=chat_template)
    texts = generate_completions(
        model,
        [p.input_ids for p in prompts],
        sampling,
        backend=backend,
        batch_size=batch_size,
        device=str(run_device),
        dtype=dtype_name(run_dtype),
        vllm_kwargs=vllm_kwargs,
        progress=progress,
    )
    rows = [
        {
            "persona": prompt.persona,
            "question_index": prompt.question_index,
            "question": questions[prompt.question_index],
            "response": completion[0],
            "model": str(model),
            "backend": backend,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "dtype": dtype_name(run_dtype),
            "chat_template_hash": prompts.chat_template_hash,
        }
        for prompt, completion in zip(prompts, texts, strict=True)
    ]
    path = atomic_write_jsonl(out_path, rows)
    log.info("wrote %d responses to %s", len(rows), path)
    return path


def load_responses(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Returns the rows of a responses JSONL file, each with at least persona, question, response.

    Raises:
        ValueError: If the file is missing, empty, or a row lacks a required key.
    """
    from persona_geometry._io import read_jsonl

    path = Path(path)
    if not path.is_file():
        invalid("path", "load_responses", "an existing JSONL file of responses", str(path))
    rows = read_jsonl(path, param="path", func="load_responses")
    if not rows:
        invalid("path", "load_responses", "a JSONL file with at least one response", str(path))
    for i, row in enumerate(rows):
        missing = [k for k in _RESPONSE_KEYS if not isinstance(row.get(k), str)]
        if missing:
            invalid(
                "path",
                "load_responses",
                f"rows with string fields {list(_RESPONSE_KEYS)}",
                f"{path}, row {i} lacking {missing}",
            )
    return rows
