"""Last-token activations of every ``persona × question`` prompt, at every requested layer.

``extract_activations`` renders the prompts with the model's chat template, runs them
(packed end to end with each persona's prefix once, or in length-sorted, token-budgeted,
left-padded batches), keeps only the final position of each requested block, and returns an
``ActivationSet``. It runs in named steps: validate → plan and key → cache → run → assemble.
Two engines:

- ``"hf"`` (default): forward hooks on the Hugging Face decoder blocks. Only a
  ``[prompt, layer, d_model]`` buffer per hook point is kept on the device; the forward is cut
  right after the last requested block, so neither the final norm nor the unembedding runs.
- ``"transformer_lens"``: TransformerLens 4.x ``TransformerBridge.run_with_cache``, for hook
  points inside a block (``resid_mid``, ``attn_out``, ``mlp_out``).

Layer ``l`` is the output of block ``l`` (``blocks.{l}.hook_resid_post``): Hugging Face's
``hidden_states[l + 1]`` for every block but the last, whose HF entry has the final norm
applied and is never used here.
"""

from __future__ import annotations

import copy
import datetime as _dt
import importlib.util
import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from persona_geometry import distributed
from persona_geometry._validation import (
    check_layers,
    check_one_of,
    check_positive_int,
    check_unique_names,
    invalid,
)
from persona_geometry.activations import HOOK_POINTS, ActivationSet
from persona_geometry.hooks import HF_HOOK_POINTS, find_layers, hook_name, record_last_token
from persona_geometry.landing import MAX_PINNED_BYTES, Landing, copy_rows, finish_copies, to_host
from persona_geometry.models import ModelHandle, dtype_name, load_model, model_fingerprint
from persona_geometry.packing import (
    PACKED_PATHS,
    build_pack,
    group_prefix_lengths,
    hidden_size,
    pack_budget,
    packed_engine,
    packed_path,
    plan_packs,
    pretrained_model,
    split_across_devices,
)
from persona_geometry.personas import Persona, PersonaSet, builtin_personas
from persona_geometry.prefix_cache import SharedPrefixes, prefix_engine, shared_prefixes
from persona_geometry.prompts import (
    PromptSet,
    chat_template_of,
    left_pad,
    render_prompts,
    render_prompts_unchecked,
)
from persona_geometry.provenance import package_versions, stable_hash
from persona_geometry.questions import builtin_questions
from persona_geometry.settings import ENGINES

__all__ = [
    "DEFAULT_MAX_MEMORY_GIB",
    "ENGINES",
    "FORWARD_PATHS",
    "extract_activations",
    "plan_batches",
]

log = logging.getLogger(__name__)

# How the forward runs, recorded as manifest["forward"]: the packed paths of the hf engine, its
# fallbacks (left-padded batches, with or without each persona's prefix cached), TransformerLens.
FORWARD_PATHS: tuple[str, ...] = (*PACKED_PATHS, "prefix_cache", "padded", "transformer_lens")
# Device memory the packed engine may use above the weights, by default.
DEFAULT_MAX_MEMORY_GIB = 2.0
_PADDED_BATCH_TOKENS = 8192
_FUNC = "extract_activations"


def extract_activations(
    model: ModelHandle | str | os.PathLike[str] | Any,
    personas: PersonaSet | Sequence[Persona] | None = None,
    questions: Sequence[str] | None = None,
    *,
    hooks: Sequence[str] | str = ("resid_post",),
    layers: int | Sequence[int] | None = None,
    engine: str | None = None,
    batch_tokens: int | None = None,
    max_batch_size: int | None = None,
    chunk_prompts: int = 1024,
    chat_template: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    layer_template: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    share_prefix: bool = True,
    pack: bool | None = None,
    max_memory_gib: float = DEFAULT_MAX_MEMORY_GIB,
    compile_blocks: bool | None = None,
    progress: bool = True,
) -> ActivationSet:
    """Returns the last-token activations of every persona × question prompt, per layer.

    Each prompt is the persona's system message, one question as the user message, and the
    generation prompt, rendered with the chat template; only the final input position (the
    token right before the answer would start) is kept. Layer ``l`` is the output of
    transformer block ``l`` (``blocks.{l}.hook_resid_post``), i.e. Hugging Face's
    ``hidden_states[l + 1]`` except for the last block: HF's last entry has the final norm
    applied, and that post-norm state is never used.

    The ``hf`` engine runs a **packed** forward where the model allows it
    (``persona_geometry.packing``): prompts end to end in sequences of at most ``batch_tokens``
    tokens, each persona's shared prefix once, a prefix-tree attention mask, no padding, last
    tokens gathered by index; FlexAttention with a block-sparse mask on a GPU, a dense mask on
    the CPU. Where it cannot run (attention without custom masks), prompts run in batches sorted
    by length and filled up to ``batch_tokens`` padded tokens, left-padded, with each persona's
    prefix cached once (``persona_geometry.prefix_cache``). ``manifest["forward"]`` records the
    path taken. Results come back in prompt order, in float32 (bfloat16 values upcast exactly).

    Numerics: in float32 every path matches a one-prompt-at-a-time ``output_hidden_states``
    reference within 1e-5 (max abs, tiny test models; 2e-6 relative on a 25M-parameter model).
    In bfloat16, batch composition (padding, batch size, packing) changes kernel reduction
    orders and so perturbs activations (up to ~2% relative per prompt). Measured on the built-in
    240 prompts (``benchmarks/bf16_tolerance.py``, CPU), the centered ``cosine_to_reference``
    moved by at most 6.4e-4 (4-layer tiny model) and 9.4e-4 (25M-parameter model) between
    batched and one-prompt-at-a-time bfloat16 runs, against 3e-7 in float32. Treat bfloat16
    cosine differences below 1e-3 as batching noise, or extract in float32.

    Under ``torchrun`` (or with ``torch.distributed`` initialised), every rank plans the units
    of work one process would run (its packs, or on the padded and TransformerLens paths its
    batches), runs a share of them with about equal tokens, and the rows are gathered
    at their prompt positions: every rank returns the same, whole set, with tensors equal to a
    one-process run of the same settings (each pack or batch is the same forward; float32 on
    CPU with the same number of threads: byte for byte) and one process's manifest plus
    ``ranks`` and ``shards``. Each rank's share resumes from its own chunks; the finished set
    is cached under one process's key (``persona_geometry.distributed``).

    Args:
        model: A ``ModelHandle`` from ``load_model``; a model folder or Hugging Face id (loaded
            with ``load_model(model, dtype=dtype, device=device)``); or a TransformerLens
            ``TransformerBridge`` you already hold (then the engine is ``"transformer_lens"``).
        personas: The personas, in order; defaults to the 12 built-in ones.
        questions: The user questions, in order; defaults to the 20 built-in probe questions.
        hooks: Hook points to keep, among ``HOOK_POINTS``. The ``hf`` engine gives
            ``resid_post`` (block output) and ``resid_pre`` (block input); ``resid_mid``,
            ``attn_out`` and ``mlp_out`` need ``engine="transformer_lens"``.
        layers: Block indices (negative count from the end); all blocks by default.
        engine: ``"hf"`` or ``"transformer_lens"``; by default ``"hf"``, or
            ``"transformer_lens"`` when ``model`` is a ``TransformerBridge``.
        batch_tokens: Most tokens in one forward: a pack's tokens (packed), or padded tokens of
            a batch (a prompt longer than this runs alone). By default a pack holds what
            ``max_memory_gib`` allows, and a padded batch 8192 tokens.
        max_batch_size: Most prompts in one forward; unlimited by default.
        chunk_prompts: Most prompts per chunk written to ``cache_dir`` while running; an
            interrupted run resumes from the last finished chunk. The packed engine makes
            chunks smaller when their results would take over an eighth of ``max_memory_gib``.
        chat_template: A Jinja chat template to use instead of the tokenizer's own.
        cache_dir: A folder for the content-addressed cache. The same extraction (same
            weights, dtype, engine, hooks, layers, personas, questions, template, token ids)
            is loaded from it instead of recomputed; anything else is recomputed.
        layer_template: Path of the decoder blocks, e.g. ``"model.layers.{num}"``, for models
            the built-in templates miss (``hf`` engine).
        dtype: Weights dtype when ``model`` is a path or id (see ``load_model``).
        device: Device when ``model`` is a path or id (see ``load_model``).
        share_prefix: ``hf`` engine: compute each persona's shared prompt prefix (system turn
            and user header) once and only the questions' own tokens after it, which halves
            the tokens of the built-in study; the activations are the same to rounding
            (≤ 1e-5 in float32).
        pack: ``hf`` engine: ``None`` (default) packs where the model allows it and falls back
            to padded batches otherwise; ``True`` requires packing (ValueError if the model's
            attention cannot take the mask); ``False`` always runs padded batches.
        max_memory_gib: Device memory the packed engine may use above the weights, in GiB
            (activations of one forward, the mask, and the results of one chunk).
        compile_blocks: Packed engine: run each decoder block through ``torch.compile``
            (norms, rotary embedding, MLP and residual adds fused; the hooks stay outside).
            ``None`` (default) compiles on a GPU (FlexAttention path, Triton installed) and not
            on the CPU. On a 7B model the first call in a process spends 8-10 s compiling and
            every later call runs about 15% faster (``benchmarks/extract_gpu.py``): pass
            ``False`` for a one-off small extraction.
        progress: Show a progress bar with prompts/s.

    Returns:
        An ``ActivationSet``: ``acts[hook]`` is ``Float[Tensor, "persona question layer d_model"]``
        with labels, prompt token counts and a provenance manifest.

    Raises:
        ValueError: On an unknown hook or engine, a layer out of range, empty or duplicate
            persona names or questions, a tokenizer without a chat template (and no
            ``chat_template``), or ``pack=True`` for a model that cannot be packed. Each message
            names the parameter.
        TypeError: If ``model`` is none of the accepted kinds.
    """
    req = _validate(
        model, personas, questions, hooks=hooks, engine=engine, batch_tokens=batch_tokens,
        max_batch_size=max_batch_size, chunk_prompts=chunk_prompts, dtype=dtype, device=device,
        pack=pack, max_memory_gib=max_memory_gib, compile_blocks=compile_blocks,
    )  # fmt: skip
    template = chat_template_of(req.tokenizer, chat_template, func=_FUNC)
    sharded = distributed.world_size() > 1 and distributed.init_process_group()
    plan_args = dict(layers=layers, layer_template=layer_template, share_prefix=share_prefix)
    if cache_dir is None and not sharded:
        # Nothing to look up first, so the device starts before the host has checked the
        # prompts' rendering (render_prompts_unchecked): the checks run while the first
        # forward does, and so do the manifest (which hashes every prompt's token ids, 60 ms
        # for 1,500 long prompts) and the result's assembly.
        prompts, checks = render_prompts_unchecked(
            req.tokenizer, req.personas, req.questions, chat_template=template
        )
        plan = _plan(req, prompts, **plan_args)
        try:
            return _run_and_assemble(req, prompts, plan, progress=progress, check=checks)
        except _PromptsChanged:
            log.info(
                "rendering every prompt and starting again: the prompts rendered once per "
                "persona failed the checks run while the first forward ran"
            )
    prompts = render_prompts(req.tokenizer, req.personas, req.questions, chat_template=template)
    plan = _plan(req, prompts, **plan_args)
    if cache_dir is None and not sharded:
        return _run_and_assemble(req, prompts, plan, progress=progress)

    manifest = _manifest(req, prompts, plan)
    if sharded:
        return _extract_across_ranks(req, prompts, plan, manifest, cache_dir, progress=progress)

    from persona_geometry.store import PartialRun, load_cached

    partial = None
    if cache_dir is not None:
        cached = load_cached(cache_dir, manifest)
        if cached is not None:
            log.info("loaded cached activations %s from %s", manifest["cache_key"], cache_dir)
            return cached
        # Holds the entry's file lock until finish() or close(): a second process extracting the
        # same set waits here, then finds the first one's result.
        partial = PartialRun(cache_dir, manifest)
        if partial.cached is not None:
            return partial.cached

    try:
        flat = _run(req, prompts, plan, partial, progress=progress)
        acts = _assemble(req, prompts, plan, flat, manifest)
    except BaseException:
        if partial is not None:
            partial.close()  # the finished chunks stay for a resume
        raise
    if partial is not None:
        partial.finish(acts)
    return acts


def _run_and_assemble(
    req: _Request,
    prompts: PromptSet,
    plan: _Plan,
    *,
    progress: bool,
    check: Callable[[], bool] | None = None,
) -> ActivationSet:
    """Runs every forward (no cache) and returns the result, its manifest and assembly made
    while the device works."""
    done: list[ActivationSet] = []
    _run(
        req, prompts, plan, None, progress=progress, check=check,
        meanwhile=lambda flat: done.append(
            _assemble(req, prompts, plan, flat, _manifest(req, prompts, plan))
        ),
    )  # fmt: skip
    return done[0]


def _assemble(
    req: _Request,
    prompts: PromptSet,
    plan: _Plan,
    flat: dict[str, Tensor],
    manifest: dict[str, Any],
) -> ActivationSet:
    """Returns the ``ActivationSet`` of ``{hook: [prompt, layer, d_model]}`` in prompt order."""
    P, Q = len(req.personas), len(req.questions)
    return ActivationSet(
        {
            hook: flat[hook].reshape(P, Q, *flat[hook].shape[1:]) for hook in req.hooks
        },  # in the order asked for
        personas=req.personas,
        questions=req.questions,
        layers=plan.layers,
        n_tokens=torch.tensor(prompts.n_tokens(), dtype=torch.long),
        manifest=manifest,
    )


def _extract_across_ranks(
    req: _Request,
    prompts: PromptSet,
    plan: _Plan,
    manifest: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None,
    *,
    progress: bool,
) -> ActivationSet:
    """Returns the whole set on every rank, each rank computing a share of one process's work.

    Every rank plans the units one process would run over all prompts (the same chunks, and in
    them the same packs or padded batches), takes a share of them with near-equal tokens
    (``distributed.balanced_shares``), and runs it; the rows are gathered at their prompt
    positions (``distributed.gather_rows``). Each unit is the same forward as in one process,
    so the set equals the one-process set, and its manifest is one process's (rank 0's, for its
    creation time) plus ``ranks`` and ``shards`` (each share's resume key, prompts, tokens, and
    seconds to compute, before the gather).

    With a cache: a set every rank finds cached is loaded; otherwise each share resumes from its
    own chunks (``<share key>.partial``, keyed by the whole set's fields and the share's prompt
    positions), and once gathered the whole set is saved under the one-process key (by rank 0,
    and by any rank that does not see it: a cache folder not shared between nodes) and the
    shares' chunks are removed. A run resumed on another number of ranks has other shares, so
    it starts over.
    """
    from persona_geometry.activations import _MANIFEST, save_activations
    from persona_geometry.store import PartialRun, entry_lock, load_cached

    n, r = distributed.world_size(), distributed.rank()
    manifest = distributed.gather_objects(manifest)[0]  # one creation time on every rank
    if cache_dir is not None:
        cached = load_cached(cache_dir, manifest)
        if all(distributed.gather_objects(cached is not None)):
            log.info("loaded cached activations %s from %s", manifest["cache_key"], cache_dir)
            return cached
    ids = [p.input_ids for p in prompts]
    units = _plan_units(req, plan, ids, set())  # one process's plan
    split = distributed.balanced_shares([u.tokens for u in units], n)
    shares = [[units[i] for i in s] for s in split]
    positions = [sorted(i for u in share for i in u.prompts) for share in shares]
    keys = [_share_manifest(manifest, k, n, positions[k])["cache_key"] for k in range(n)]
    log.info(
        "rank %d of %d: extracting %d of %d prompts (%d of %d units of work)",
        r, n, len(positions[r]), len(ids), len(shares[r]), len(units),
    )  # fmt: skip
    partial = None
    if cache_dir is not None and shares[r]:
        partial = PartialRun(cache_dir, _share_manifest(manifest, r, n, positions[r]))
    try:
        start = time.perf_counter()
        mine = (
            _run(req, prompts, plan, partial, progress=progress, share=shares[r])
            if shares[r]
            else None
        )
        seconds = distributed.gather_objects(round(time.perf_counter() - start, 3))
        flat = distributed.gather_rows(mine, positions, len(ids))
    except BaseException:
        if partial is not None:
            partial.close()  # the finished chunks stay for a resume
        raise
    manifest = {
        **manifest,
        "ranks": n,
        "shards": [
            {"cache_key": k, "n_prompts": len(p), "tokens": sum(u.tokens for u in s), "seconds": t}
            for k, p, s, t in zip(keys, positions, shares, seconds, strict=True)
        ],
    }
    acts = _assemble(req, prompts, plan, flat, manifest)
    if cache_dir is not None:
        folder = Path(cache_dir) / manifest["cache_key"]
        for turn in (r == 0, r != 0):  # rank 0 first, then whoever does not see its entry
            if turn and not (folder / _MANIFEST).is_file():
                with entry_lock(cache_dir, manifest["cache_key"]):
                    save_activations(acts, folder)
            distributed.barrier()
        if partial is not None:
            shutil.rmtree(partial.folder, ignore_errors=True)
            partial.close()
    return acts


def _share_manifest(
    manifest: dict[str, Any], rank: int, ranks: int, positions: Sequence[int]
) -> dict[str, Any]:
    """Returns the manifest of one rank's share: the whole set's, keyed by the share's prompts."""
    from persona_geometry.store import cache_key

    share = {
        **manifest,
        "prompt_ids_hash": stable_hash(
            {"prompt_ids_hash": manifest["prompt_ids_hash"], "positions": list(positions)}
        ),
        "n_prompts": len(positions),
        "share": {"rank": rank, "ranks": ranks},
    }
    share["cache_key"] = cache_key(share)
    return share


@dataclass(frozen=True)
class _Request:
    """The checked arguments of one extraction."""

    handle: ModelHandle | None  # None with a bridge
    bridge: Any
    engine: str
    hooks: list[str]
    personas: PersonaSet
    questions: tuple[str, ...]
    batch_tokens: int | None
    max_batch_size: int | None
    chunk_prompts: int
    pack: bool | None
    max_memory_bytes: float
    compile_blocks: bool | None

    @property
    def tokenizer(self) -> Any:
        return self.bridge.tokenizer if self.bridge is not None else self.handle.tokenizer


@dataclass(frozen=True)
class _Plan:
    """How an extraction runs: its layers, forward path, budgets and prefix sharing."""

    layers: list[int]
    n_layers: int
    layer_template: str | None
    identity: dict[str, Any]
    forward: str  # one of FORWARD_PATHS
    batch_tokens: int
    chunk_prompts: int
    compile_blocks: bool = False  # packed paths only
    shared: SharedPrefixes | None = None  # the prefix_cache path
    prefix_lens: tuple[int, ...] | None = None  # packed paths: per persona

    @property
    def packed(self) -> bool:
        return self.forward in PACKED_PATHS

    @property
    def share_prefix(self) -> bool:
        return self.shared is not None or bool(self.prefix_lens and any(self.prefix_lens))


# --- step 1: validate -----------------------------------------------------------------------
def _validate(
    model: Any,
    personas: PersonaSet | Sequence[Persona] | None,
    questions: Sequence[str] | None,
    *,
    hooks: Sequence[str] | str,
    engine: str | None,
    batch_tokens: int | None,
    max_batch_size: int | None,
    chunk_prompts: int,
    dtype: str | torch.dtype | None,
    device: str | torch.device | None,
    pack: bool | None,
    max_memory_gib: float,
    compile_blocks: bool | None,
) -> _Request:
    """Returns the checked arguments, with the model loaded when a path or id was given."""
    hooks = _check_hooks(hooks)
    if engine is not None:
        check_one_of(engine, "engine", _FUNC, ENGINES)
    if batch_tokens is not None:
        batch_tokens = check_positive_int(batch_tokens, "batch_tokens", _FUNC)
    chunk_prompts = check_positive_int(chunk_prompts, "chunk_prompts", _FUNC)
    if max_batch_size is not None:
        max_batch_size = check_positive_int(max_batch_size, "max_batch_size", _FUNC)
    if pack is not None and not isinstance(pack, bool):
        invalid("pack", _FUNC, "None, True or False", pack, exc=TypeError)
    if (
        isinstance(max_memory_gib, bool)
        or not isinstance(max_memory_gib, int | float)
        or not max_memory_gib > 0
    ):
        invalid("max_memory_gib", _FUNC, "a positive number of GiB", max_memory_gib)
    if compile_blocks is not None and not isinstance(compile_blocks, bool):
        invalid("compile_blocks", _FUNC, "None, True or False", compile_blocks, exc=TypeError)
    personas = _check_personas(personas)
    questions = _check_questions(questions)

    bridge = model if _is_bridge(model) else None
    if bridge is None:
        if isinstance(model, str | os.PathLike):
            model = load_model(model, dtype=dtype, device=device)
        elif not isinstance(model, ModelHandle):
            invalid(
                "model",
                _FUNC,
                "a ModelHandle, a model folder or id, or a TransformerBridge",
                type(model).__name__,
                exc=TypeError,
            )
        elif dtype is not None or device is not None:
            invalid(
                "dtype" if dtype is not None else "device",
                _FUNC,
                "None when model is an already loaded ModelHandle (pass it to load_model)",
                dtype if dtype is not None else device,
            )
    elif dtype is not None or device is not None:
        invalid(
            "dtype" if dtype is not None else "device",
            _FUNC,
            "None when model is a TransformerBridge",
            dtype if dtype is not None else device,
        )
    engine = engine or ("transformer_lens" if bridge is not None else "hf")
    if bridge is not None and engine != "transformer_lens":
        invalid("engine", _FUNC, "'transformer_lens' when model is a TransformerBridge", engine)
    if engine == "hf":
        for hook in hooks:
            if hook not in HF_HOOK_POINTS:
                invalid(
                    "hooks",
                    _FUNC,
                    f"hook points the 'hf' engine captures, {list(HF_HOOK_POINTS)} "
                    "(engine='transformer_lens' also gives "
                    f"{[h for h in HOOK_POINTS if h not in HF_HOOK_POINTS]})",
                    hook,
                )
    elif pack:
        invalid(
            "pack",
            _FUNC,
            "None or False with engine='transformer_lens' (packing is an 'hf' engine path)",
            pack,
        )
    return _Request(
        handle=None if bridge is not None else model,
        bridge=bridge,
        engine=engine,
        hooks=hooks,
        personas=personas,
        questions=questions,
        batch_tokens=batch_tokens,
        max_batch_size=max_batch_size,
        chunk_prompts=chunk_prompts,
        pack=pack,
        max_memory_bytes=float(max_memory_gib) * 2**30,
        compile_blocks=compile_blocks,
    )


# --- step 2: plan and key -------------------------------------------------------------------
def _plan(
    req: _Request,
    prompts: PromptSet,
    *,
    layers: Any,
    layer_template: str | None,
    share_prefix: bool,
) -> _Plan:
    """Returns the layers, the forward path and its budgets, and the shared prefixes."""
    if req.bridge is not None:
        bridge = req.bridge
        n_layers = int(bridge.cfg.n_layers)
        identity = {
            "model_id": str(getattr(bridge.cfg, "model_name", "unknown")),
            "revision": None,
            "weights_id": f"params:{model_fingerprint(bridge)}",
            "adapter": None,
            "dtype": dtype_name(bridge.cfg.dtype),
            "device": str(bridge.cfg.device),
        }
        template_path = None
    else:
        handle = req.handle
        template_path, blocks = find_layers(handle.model, layer_template)
        n_layers = len(blocks)
        identity = handle.provenance()
        if not identity["weights_id"]:  # A hand-made handle: identify the weights by their values.
            identity["weights_id"] = f"params:{model_fingerprint(handle.model)}"
    layer_list = check_layers(layers, n_layers, _FUNC)
    common = dict(
        layers=layer_list, n_layers=n_layers, layer_template=template_path, identity=identity
    )
    if req.engine == "transformer_lens":
        return _Plan(
            **common,
            forward="transformer_lens",
            batch_tokens=req.batch_tokens or _PADDED_BATCH_TOKENS,
            chunk_prompts=req.chunk_prompts,
        )

    ids = [p.input_ids for p in prompts]
    Q = len(req.questions)
    groups = [list(range(i * Q, (i + 1) * Q)) for i in range(len(req.personas))]
    path = packed_path(req.handle.model, req.handle.device) if req.pack is not False else None
    if req.pack and path is None:
        invalid(
            "pack",
            _FUNC,
            "None or False for this model: its attention takes no custom mask (sdpa, eager or "
            "flex_attention)",
            req.pack,
        )
    if path is not None:
        config = pretrained_model(req.handle.model).config
        # An eighth of the budget for the results of a chunk, the rest for the forward.
        per_prompt = 4 * len(layer_list) * len(req.hooks) * hidden_size(config)
        chunk = max(1, min(req.chunk_prompts, int(req.max_memory_bytes / 8 / per_prompt)))
        forward_bytes = req.max_memory_bytes - 2 * chunk * per_prompt
        budget = pack_budget(config, req.handle.dtype, path, forward_bytes, cap=req.batch_tokens)
        prefix_lens = group_prefix_lengths(ids, groups) if share_prefix else [0] * len(groups)
        return _Plan(
            **common,
            # On by default on a GPU: fused norms and MLP pay from the second call on.
            compile_blocks=(
                req.compile_blocks
                if req.compile_blocks is not None
                else path == "packed_flex"
                and req.handle.device.type == "cuda"
                and importlib.util.find_spec("triton") is not None  # what inductor needs there
            ),
            forward=path,
            batch_tokens=budget,
            chunk_prompts=chunk,
            prefix_lens=tuple(prefix_lens),
        )
    shared = shared_prefixes([[ids[i] for i in g] for g in groups]) if share_prefix else None
    return _Plan(
        **common,
        forward="prefix_cache" if shared is not None else "padded",
        batch_tokens=req.batch_tokens or _PADDED_BATCH_TOKENS,
        chunk_prompts=req.chunk_prompts,
        shared=shared,
    )


def _manifest(req: _Request, prompts: PromptSet, plan: _Plan) -> dict[str, Any]:
    """Returns the provenance manifest, with the cache key of everything the activations depend
    on."""
    from persona_geometry.store import FORMAT_VERSION, cache_key

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        **plan.identity,
        "engine": req.engine,
        "forward": plan.forward,
        "hooks": list(req.hooks),
        "layers": plan.layers,
        "n_layers": plan.n_layers,
        "layer_template": plan.layer_template,
        "chat_template_hash": prompts.chat_template_hash,
        "persona_hash": req.personas.content_hash(),
        "question_hash": stable_hash(list(req.questions)),
        "prompt_ids_hash": prompts.content_hash(),
        "n_prompts": len(prompts),
        "batch_tokens": plan.batch_tokens,
        "max_batch_size": req.max_batch_size,
        "chunk_prompts": plan.chunk_prompts,
        "share_prefix": plan.share_prefix,
        "compile_blocks": plan.compile_blocks,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_versions": package_versions(),
    }
    manifest["cache_key"] = cache_key(manifest)
    return manifest


# --- step 3: run ----------------------------------------------------------------------------
class _PromptsChanged(Exception):
    """Raised by ``_run`` when the prompts' checks (``render_prompts_unchecked``), run while the
    first forward ran, failed: the prompts differ from ``render_prompts``'."""


def _run(
    req: _Request,
    prompts: PromptSet,
    plan: _Plan,
    partial: Any,
    *,
    progress: bool,
    share: Sequence[_Unit] | None = None,
    check: Callable[[], bool] | None = None,
    meanwhile: Callable[[dict[str, Tensor]], Any] | None = None,
) -> dict[str, Tensor]:
    """Returns ``{hook: [prompt, layer, d_model]}`` in prompt order, computing what the cache
    lacks.

    With ``share`` (a rank's share of one process's units of work), only its prompts, in
    ascending position order; ``partial`` then holds the share's chunks, indexed by row.
    ``check`` runs once the first forward is launched, and on False the run stops with
    ``_PromptsChanged``. ``meanwhile`` gets the results once every forward is launched, before
    their copies to the host are waited for. On a GPU, host work in both overlaps the
    device's.
    """
    ids = [p.input_ids for p in prompts]
    if share is None:
        rows = list(range(len(ids)))
        done = partial.done() if partial is not None else set()
        units = _plan_units(req, plan, ids, done)
    else:
        rows = sorted(i for u in share for i in u.prompts)
        done = {rows[k] for k in partial.done()} if partial is not None else set()
        # A share's chunks hold whole units, so a unit is done or not.
        units = [u for u in share if u.prompts[0] not in done]
    row_of = {prompt: k for k, prompt in enumerate(rows)}
    chunks = [list(c) for _, c in itertools.groupby(units, key=lambda u: u.chunk)]
    flat: dict[str, Tensor] = {}
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(rows),
        initial=len(rows) - sum(len(u.prompts) for u in units),
        unit="prompt",
        desc=f"extract ({plan.forward})",
        disable=not progress,
    )
    pad_id = _pad_id(req.tokenizer)
    pending = [check] if check is not None else []

    def run_check() -> None:
        if pending and not pending.pop()():
            raise _PromptsChanged

    landing = _landing_for(req, plan, units) if partial is None and share is None else None
    try:
        # No engine (no bridge, no prefix pass) when every chunk is already on disk.
        with _engine(req, plan) if chunks else nullcontext() as engine:

            def forward(work: Any, **kwargs: Any) -> dict[str, Tensor]:
                out = engine(work, **kwargs)
                run_check()  # while the first forward runs
                return out

            if landing is not None:  # a packed run on a GPU: packs straight to the host
                for k, unit in enumerate(units):
                    a, b = unit.prompts[0], unit.prompts[-1] + 1
                    last = k == len(units) - 1
                    out = forward(
                        build_pack(ids, unit.work, pad_id=pad_id),
                        on_layer=landing.early(a, b) if last else None,
                    )
                    landing.land(out, a, b, last=last)
                    bar.update(b - a)
                flat = landing.flat
            else:
                for chunk in chunks:
                    # Packs are built one at a time, as they run.
                    work = (
                        (
                            u.prompts,
                            build_pack(ids, u.work, pad_id=pad_id) if plan.packed else u.work,
                        )
                        for u in chunk
                    )
                    prompts_of_chunk = [i for u in chunk for i in u.prompts]
                    order, out = _run_chunk(forward, prompts_of_chunk, work, bar)
                    order = [row_of[i] for i in order]  # ascending, like the prompts
                    if partial is not None:
                        partial.write(order, {hook: to_host(t) for hook, t in out.items()})
                    else:
                        copy_rows(flat, order, out, len(rows))
        run_check()  # when no forward ran
        if meanwhile is not None:
            meanwhile(flat)
        if landing is not None:
            landing.finish()
        finish_copies(flat)
    finally:
        bar.close()

    if partial is not None:
        return partial.assemble(len(rows), req.hooks)
    return flat


@dataclass(frozen=True)
class _Unit:
    """One forward of an extraction: a pack (packed paths) or a padded batch."""

    chunk: int  # the chunk it belongs to
    prompts: list[int]  # prompt positions, in the order the forward returns their rows
    tokens: int  # tokens it computes (what the ranks of a sharded run balance)
    work: Any  # a PackPlan (built when it runs), or the batch's token ids


def _plan_units(
    req: _Request, plan: _Plan, ids: Sequence[Sequence[int]], done: set[int]
) -> list[_Unit]:
    """Returns the units of work still to run, chunk by chunk, in the order they run."""
    if plan.packed:
        # Persona-major order keeps each persona's prompts together, so they share a pack.
        remaining = [i for i in range(len(ids)) if i not in done]
        chunks = [
            remaining[s : s + plan.chunk_prompts]
            for s in range(0, len(remaining), plan.chunk_prompts)
        ]
    else:
        chunks = _plan_chunks(ids, done, plan.chunk_prompts)
    work = _pack_work if plan.packed else _batch_work
    return [unit for c, chunk in enumerate(chunks) for unit in work(req, plan, ids, chunk, c)]


@contextmanager
def _engine(req: _Request, plan: _Plan) -> Iterator[Callable[[Any], dict[str, Tensor]]]:
    """Yields the forward of the plan's path: one unit of work in, ``{hook: [prompt, layer,
    d_model]}`` out."""
    if plan.forward == "transformer_lens":
        bridge = req.bridge if req.bridge is not None else _bridge_from_handle(req.handle)
        with _tl_engine(bridge, plan.layers, req.hooks, plan.n_layers) as forward:
            yield forward
    else:
        with _hf_engine(req.handle, plan, req.hooks) as forward:
            yield forward


def _batch_work(
    req: _Request, plan: _Plan, ids: Sequence[Sequence[int]], chunk: list[int], index: int
) -> list[_Unit]:
    """Returns the chunk's padded batches (their work: the prompts' token ids)."""
    shared = plan.shared
    # What a batch's token budget counts: the tokens it computes (the suffix, with a shared prefix).
    costs = [
        len(ids[i]) - (len(shared.prefix_for(ids[i])) if shared is not None else 0) for i in chunk
    ]
    work = []
    for batch in plan_batches(costs, plan.batch_tokens, req.max_batch_size):
        positions = [chunk[j] for j in batch]
        tokens = len(batch) * max(costs[j] for j in batch)
        work.append(_Unit(index, positions, tokens, [ids[i] for i in positions]))
    return work


def _pack_work(
    req: _Request, plan: _Plan, ids: Sequence[Sequence[int]], chunk: list[int], index: int
) -> list[_Unit]:
    """Returns the chunk's packs (their work: the pack's plan)."""
    Q = len(req.questions)
    groups: list[list[int]] = []
    for i in chunk:  # chunks are in persona-major order
        if groups and groups[-1][0] // Q == i // Q:
            groups[-1].append(i)
        else:
            groups.append([i])
    lens = [plan.prefix_lens[g[0] // Q] for g in groups]
    return [
        _Unit(index, p.prompts, p.n_tokens, p)
        for p in plan_packs(ids, groups, lens, plan.batch_tokens, req.max_batch_size)
    ]


# --- validation -----------------------------------------------------------------------------
def _check_hooks(hooks: Sequence[str] | str) -> list[str]:
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(hooks)
    if not hooks:
        invalid("hooks", _FUNC, f"a non-empty list of hook points from {list(HOOK_POINTS)}", hooks)
    for hook in hooks:
        check_one_of(hook, "hooks", _FUNC, HOOK_POINTS)
    return list(dict.fromkeys(hooks))


def _check_personas(personas: PersonaSet | Sequence[Persona] | None) -> PersonaSet:
    if personas is None:
        return builtin_personas()
    if isinstance(personas, PersonaSet):
        return personas
    if isinstance(personas, str) or not isinstance(personas, Sequence):
        invalid(
            "personas",
            _FUNC,
            "a PersonaSet or a sequence of Persona objects",
            personas,
            exc=TypeError,
        )
    for p in personas:
        if not isinstance(p, Persona):
            invalid("personas", _FUNC, "a sequence of Persona objects", p, exc=TypeError)
    check_unique_names([p.name for p in personas], "personas", _FUNC)
    return PersonaSet(personas)


def _check_questions(questions: Sequence[str] | None) -> tuple[str, ...]:
    if questions is None:
        return tuple(builtin_questions())
    if isinstance(questions, str):
        invalid(
            "questions",
            _FUNC,
            "a sequence of question strings (not one string)",
            questions,
            exc=TypeError,
        )
    return tuple(check_unique_names(list(questions), "questions", _FUNC))


def _is_bridge(model: Any) -> bool:
    # Checked by class name so that TransformerLens is imported only when it is used.
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


# --- batching -------------------------------------------------------------------------------
def plan_batches(
    lengths: Sequence[int], batch_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Returns batches of positions into ``lengths``: longest first, each within the token budget.

    Positions are sorted by decreasing length (ties by position) and cut greedily so that
    ``batch size × longest prompt ≤ batch_tokens`` (padded tokens), so padding is minimal and
    the first batch, the largest in memory, fails first if anything does.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and ((len(current) + 1) * longest > batch_tokens or full):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _plan_chunks(
    ids: Sequence[Sequence[int]], done: set[int], chunk_prompts: int
) -> list[list[int]]:
    """Returns the chunks still to compute: the remaining prompts, longest first, cut in runs.

    A resumed run plans over the prompts not yet done, so it forms the same chunks (and the same
    batches) as the uninterrupted run would have from there on: bit-identical results.
    """
    order = [i for i in sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i)) if i not in done]
    return [order[s : s + chunk_prompts] for s in range(0, len(order), chunk_prompts)]


def _run_chunk(
    forward: Callable[[Any], dict[str, Tensor]],
    chunk: list[int],
    work: Iterable[tuple[list[int], Any]],
    bar: Any,
) -> tuple[list[int], dict[str, Float[Tensor, "prompt layer d_model"]]]:
    """Returns the chunk's prompt positions in ascending order and ``{hook: [prompt, layer,
    d_model]}`` on the model's device, in that order.

    Each unit of work (a padded batch or a pack) returns the rows of its prompts, which are
    scattered into a per-chunk buffer on the model's device, so the chunk crosses to the host
    in one copy (``copy_rows``) instead of a host-side scatter per batch. A chunk of one unit
    whose rows are in order (the built-in study's one pack) comes back as the unit returned it.
    """
    order = sorted(chunk)
    row_of = {prompt: row for row, prompt in enumerate(order)}
    buffers: dict[str, Tensor] = {}
    for prompts, item in work:
        out = forward(item)
        if not buffers and list(prompts) == order:
            bar.update(len(prompts))
            return order, out  # one unit of the whole chunk, in order: nothing to scatter
        rows = torch.as_tensor([row_of[i] for i in prompts])
        for hook, t in out.items():
            if hook not in buffers:
                buffers[hook] = torch.empty(
                    (len(chunk), *t.shape[1:]), dtype=t.dtype, device=t.device
                )
            # No host wait on a GPU (page-locked, non-blocking): the next batch is prepared
            # meanwhile.
            on_device = (
                rows.pin_memory().to(t.device, non_blocking=True)
                if t.device.type == "cuda"
                else rows
            )
            buffers[hook].index_copy_(0, on_device, t)
        bar.update(len(prompts))
    return order, buffers


def _landing_for(req: _Request, plan: _Plan, units: Sequence[_Unit]) -> Landing | None:
    """Returns a ``Landing`` for a packed run on one GPU whose packs each hold a consecutive range
    of prompts and whose results fit page-locked memory; None otherwise (``copy_rows``)."""
    device = req.handle.device if req.handle is not None else None
    if not plan.packed or device is None or device.type != "cuda" or not units:
        return None
    if split_across_devices(req.handle.model):  # rows on the last block's device
        return None
    if any(u.prompts != list(range(u.prompts[0], u.prompts[-1] + 1)) for u in units):
        return None
    rows = sum(len(u.prompts) for u in units)
    d_model = hidden_size(pretrained_model(req.handle.model).config)
    if 4 * rows * len(plan.layers) * len(req.hooks) * d_model > MAX_PINNED_BYTES:
        return None
    return Landing(device, rows)


def _left_pad(
    batch: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(input_ids, attention_mask, position_ids)``, left-padded, on ``device``.

    Position ids count real tokens only (0 at each prompt's first token), so a padded prompt
    sees exactly the positions it would see alone.
    """
    input_ids, mask = left_pad(batch, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    non_blocking = device.type == "cuda"
    return (
        input_ids.to(device, non_blocking=non_blocking),
        mask.to(device, non_blocking=non_blocking),
        positions.to(device, non_blocking=non_blocking),
    )


def _pad_id(tokenizer: Any) -> int:
    # Padded positions are masked out, so any valid id works when the tokenizer has no pad token.
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


# --- engines --------------------------------------------------------------------------------
@contextmanager
def _hf_engine(
    handle: ModelHandle, plan: _Plan, hooks: list[str]
) -> Iterator[Callable[[Any], dict[str, Tensor]]]:
    """Yields the ``hf`` engine's forward: forward hooks on the decoder blocks, last positions only.

    The base model (no unembedding) runs with ``use_cache=False``, and the forward stops right
    after the last requested block, so the final norm and later blocks are skipped too. The
    only per-layer Python is the hook itself, one ``copy_`` of ``[prompt, d_model]``. Packed
    paths take a ``Pack`` (``persona_geometry.packing``); the ``prefix_cache`` path runs each
    prefix once and the batches' suffixes against its cached keys and values
    (``persona_geometry.prefix_cache``); ``padded`` runs left-padded batches of token ids.
    """
    model = handle.model
    base = getattr(model, "base_model", None) or model
    pad_id = _pad_id(handle.tokenizer)
    layers = plan.layers
    with record_last_token(
        model, layers, points=hooks, layer_template=plan.layer_template
    ) as recorder:
        if plan.packed:
            blocks = find_layers(model, plan.layer_template)[1][: max(layers) + 1]
            with packed_engine(
                model,
                base,
                recorder,
                path=plan.forward,
                device=handle.device,
                dtype=handle.dtype,
                compile_blocks=blocks if plan.compile_blocks else [],
                # The last block's output is read at the last tokens only (its input, when
                # only resid_pre is asked for, and then the block does not run at all).
                last_block=blocks[-1] if "resid_post" in hooks else None,
            ) as forward:
                yield forward
            return
        if plan.shared is not None:
            with prefix_engine(
                base,
                recorder,
                plan.shared,
                # The forward stops after the last hook: block max(layers) runs only for resid_post.
                n_cached_layers=max(layers) + ("resid_post" in hooks),
                pad_id=pad_id,
                device=handle.device,
                batch_tokens=plan.batch_tokens,
            ) as forward:
                yield forward
            return

        def forward(batch: Sequence[Sequence[int]]) -> dict[str, Tensor]:
            input_ids, mask, positions = _left_pad(batch, pad_id, handle.device)
            with torch.inference_mode():
                return recorder.run(
                    lambda: base(
                        input_ids=input_ids,
                        attention_mask=mask,
                        position_ids=positions,
                        use_cache=False,
                    ),
                    len(batch),
                )

        yield forward


def _bridge_from_handle(handle: ModelHandle) -> Any:
    """Returns a TransformerBridge around a copy of the handle's model.

    The bridge rewrites the model it wraps in place (its blocks become bridge components and
    attention is switched to eager), so it gets a deep copy and the handle stays usable by the
    ``hf`` engine. That costs a second copy of the weights in memory; pass a bridge you hold
    to avoid it.
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as e:
        raise ImportError(
            "engine='transformer_lens' needs TransformerLens 4.x: pip install "
            "'persona-geometry[tl]'"
        ) from e
    return TransformerBridge.boot_transformers(
        str(handle.path) if handle.path is not None else handle.model_id,
        hf_model=copy.deepcopy(handle.model),
        tokenizer=copy.deepcopy(handle.tokenizer),
        device=handle.device,
        dtype=handle.dtype,
    )


@contextmanager
def _tl_engine(
    bridge: Any, layers: list[int], hooks: list[str], n_layers: int
) -> Iterator[Callable[[Any], dict[str, Tensor]]]:
    """Yields the ``transformer_lens`` engine's batch function: ``run_with_cache``, last position
    only."""
    names = {hook_name(layer, point) for layer in layers for point in hooks}
    pad_id = _pad_id(bridge.tokenizer)
    device = torch.device(str(bridge.cfg.device))
    # Stop after the last requested block when a later one exists (skips the unembedding).
    stop = max(layers) + 1 if max(layers) + 1 < n_layers else None

    def forward(batch: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        input_ids, mask, positions = _left_pad(batch, pad_id, device)
        with torch.no_grad():
            _, cache = bridge.run_with_cache(
                input_ids,
                names_filter=lambda name: name in names,
                attention_mask=mask,
                position_ids=positions,
                return_type=None,
                pos_slice=-1,
                stop_at_layer=stop,
            )
        return {
            point: torch.stack(
                [cache[hook_name(layer, point)][:, -1] for layer in layers], dim=1
            ).float()
            for point in hooks
        }

    yield forward
