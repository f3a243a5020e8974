"""The Hugging Face sampling loop: many prompts, completions and adapters in full batches.

One decode loop serves the HF back end of source-rate evaluation, response generation and
steering. What makes it fast and repeatable:

- rows (adapter × prompt × completion) are ordered by adapter and prompt length and cut into
  batches that stay full across adapter boundaries; one base model in memory serves every
  adapter, unmerged: a batch holds a few contiguous runs of rows per adapter, and a forward hook
  on each LoRA layer adds each run's own low-rank update to the base output (two matmuls per
  run, on views, without the per-row index lists of peft's ``adapter_names=`` path, which
  remains the fallback for LoRA variants such as DoRA);
- each batch prefills every distinct (adapter, prompt) once and copies its KV cache to the
  completions that share it;
- a row stops at its end token; when a quarter of a batch has stopped, the finished rows are
  dropped from the cache so that the rest decode in a smaller batch;
- every completion draws its randomness from its own uniforms, seeded by
  ``stable_seed(seed, "hf", prompt index, completion index)``: inverse-CDF sampling over the
  nucleus in token-id order needs one uniform per step, so a completion does not depend on the
  batch it lands in, the batch size, the other prompts or the other adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from persona_geometry.provenance import stable_seed

__all__ = ["BASE_ADAPTER", "auto_batch_size", "sample_token_ids"]

log = logging.getLogger(__name__)

# peft's name for "no adapter" in a mixed batch.
BASE_ADAPTER = "__base__"

# Drop finished rows from the KV cache once this fraction of a batch has stopped.
_COMPACT_FRACTION = 0.25
# Steps between checks of which rows stopped (each check waits for the device).
_CHECK_EVERY = 8


@dataclass(frozen=True)
class _Row:
    adapter: int  # index into the adapter list
    prompt: int
    completion: int


def completion_uniforms(seed: int, prompt_index: int, completion_index: int, n_steps: int) -> Any:
    """Returns the ``n_steps`` uniforms in [0, 1) that drive one completion's sampling (float64)."""
    import torch

    g = torch.Generator().manual_seed(stable_seed(seed, "hf", prompt_index, completion_index))
    return torch.rand(n_steps, generator=g, dtype=torch.float64)


def next_tokens(logits: Any, uniforms: Any | None, *, temperature: float, top_p: float) -> Any:
    """Returns one token per row: argmax when ``uniforms`` is None, else a nucleus sample.

    The nucleus (the most probable tokens whose mass reaches ``top_p``; ties at its edge kept)
    is found by sorting; the token is then chosen by inverse CDF in token-id order, so a tiny
    change in the logits moves the choice only when the uniform sits on a boundary.

    Args:
        logits: ``[batch, vocab]`` next-token logits.
        uniforms: ``[batch]`` uniforms in [0, 1), or None for greedy decoding.
        temperature: Divides the logits (> 0 when sampling).
        top_p: Nucleus mass in (0, 1].
    """
    import torch

    if uniforms is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        ordered = torch.sort(probs, dim=-1, descending=True).values
        before = row_cumsum(ordered) - ordered  # mass of the tokens ranked above each one
        n_keep = (before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        threshold = ordered.gather(-1, n_keep - 1)
        probs = torch.where(
            probs >= threshold, probs, torch.zeros((), dtype=probs.dtype, device=probs.device)
        )
    cdf = row_cumsum(probs)
    target = uniforms.to(cdf.device, torch.float64).unsqueeze(-1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return picked.clamp(max=logits.shape[-1] - 1)


def row_cumsum(x: Any) -> Any:
    """Returns the float64 cumulative sums along the last dimension of a ``[rows, n]`` tensor.

    On CUDA a 2-D cumsum along long rows (a 152k-token vocabulary) runs far below bandwidth
    (pytorch/pytorch#122170), while a 1-D scan is fast: the rows are scanned as one sequence
    and each row's starting total subtracted. In float64 that offset costs ~1e-16 × the row
    index in precision. On CPU the plain 2-D cumsum is used, so a row's sums never depend on
    the rows beside it.
    """
    x = x.double()
    if x.device.type != "cuda":
        return x.cumsum(dim=-1)
    return _cumsum_by_one_scan(x)


def _cumsum_by_one_scan(x: Any) -> Any:
    import torch

    flat = x.reshape(-1).cumsum(dim=0).view(x.shape)
    starts = torch.cat([flat.new_zeros(1), flat[:-1, -1]])
    return flat - starts.unsqueeze(-1)


def auto_batch_size(model: Any, *, max_tokens: int, n_rows: int, cap: int = 2048) -> int:
    """Returns how many rows fit in a batch: all of them on CPU (up to 64), by free memory on GPU.

    A row costs its KV cache at ``max_tokens`` (allocated once, :class:`~persona_geometry.kv_cache.
    GrowingCache`) plus a few float32 copies of the vocabulary row (softmax, sort, cumulative
    sums); half the free memory is given to the batch.
    """
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return max(1, min(n_rows, 64))
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    kv = 2 * config.num_hidden_layers * heads * head_dim * itemsize * max_tokens
    per_row = kv + 6 * 8 * config.vocab_size
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(n_rows, cap, int(free * 0.5 // per_row)))


def sample_token_ids(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n_completions: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    pad_id: int,
    eos_ids: Sequence[int],
    adapters: Sequence[str] | None = None,
    batch_size: int | None = None,
    min_new_tokens: int = 0,
    progress: bool = True,
) -> list[list[list[list[int]]]]:
    """Returns new token ids cut before the first end token, ``[adapter][prompt][completion][tok]``.

    Args:
        model: A causal LM (a peft model holding every adapter named in ``adapters``, unmerged).
        prompt_ids: Token ids of each prompt.
        n_completions: Completions per prompt and adapter.
        max_new_tokens: The most new tokens per completion.
        temperature: 0 decodes greedily.
        top_p: Nucleus mass.
        seed: Base seed of every completion's uniforms.
        pad_id: Token fed to rows that have stopped, and used for left padding.
        eos_ids: Tokens that end a completion.
        adapters: peft adapter names (``BASE_ADAPTER`` for none), one result list each; None
            samples the model as it is.
        batch_size: Rows per batch; sized to memory when None.
        min_new_tokens: End tokens are suppressed before this many new tokens (benchmarks).
        progress: Show a progress bar over rows.
    """
    import torch
    from tqdm.auto import tqdm

    names = list(adapters) if adapters is not None else [None]
    rows = [
        _Row(a, p, c)
        for a in range(len(names))
        for p in range(len(prompt_ids))
        for c in range(n_completions)
    ]
    # Longest prompts first within an adapter: batches hold prompts of similar length, and the
    # largest cache is allocated first.
    rows.sort(key=lambda r: (r.adapter, -len(prompt_ids[r.prompt]), r.prompt, r.completion))
    greedy = temperature == 0
    if batch_size is None:
        longest = max(len(p) for p in prompt_ids) + max_new_tokens
        fit = auto_batch_size(model, max_tokens=longest, n_rows=len(rows))
        batch_size = -(
            -len(rows) // -(-len(rows) // fit)
        )  # as many batches as needed, evenly filled
    out: list[list[list[list[int]]]] = [
        [[[] for _ in range(n_completions)] for _ in prompt_ids] for _ in names
    ]
    lora = (
        _SegmentedLora.of(model, [n for n in names if n is not None and n != BASE_ADAPTER])
        if adapters is not None
        else None
    )
    bar = tqdm(total=len(rows), desc="sampling (hf)", unit="completion", disable=not progress)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        uniforms = None
        if not greedy:
            uniforms = torch.stack(
                [completion_uniforms(seed, r.prompt, r.completion, max_new_tokens) for r in batch]
            )
        tokens = _decode_batch(
            model,
            [prompt_ids[r.prompt] for r in batch],
            [(r.adapter, r.prompt) for r in batch],
            [names[r.adapter] for r in batch] if adapters is not None else None,
            uniforms,
            lora=lora,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            pad_id=pad_id,
            eos_ids=list(eos_ids),
        )
        for r, ids in zip(batch, tokens, strict=True):
            out[r.adapter][r.prompt][r.completion] = ids
        bar.update(len(batch))
    bar.close()
    return out


class _SegmentedLora:
    """Per-row LoRA for rows grouped by adapter: each run of rows gets its adapter's update.

    Attributes:
        rows: The peft adapter name of every row of the current batch (runs are contiguous).
    """

    def __init__(self, model: Any, layers: list[tuple[Any, dict[str, tuple[Any, Any]]]]):
        self.model, self.layers, self.rows = model, layers, []

    @classmethod
    def of(cls, model: Any, names: Sequence[str]) -> _SegmentedLora | None:
        """Returns the hooks' weights for ``names``, or None where peft's own path must serve."""
        import torch
        from peft.tuners.lora import LoraLayer

        if not hasattr(model, "disable_adapter"):
            return None
        layers = []
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            if getattr(module, "lora_variant", None) or any(
                module.use_dora.get(n, False) for n in names
            ):
                return None
            if not hasattr(module, "get_base_layer") or not isinstance(
                module.get_base_layer(), torch.nn.Linear
            ):
                return None
            weights = {}
            dtype = module.get_base_layer().weight.dtype  # peft may keep LoRA weights in float32
            for name in names:
                if name in module.lora_A:
                    a = module.lora_A[name].weight.to(dtype)  # [r, in]
                    b = (module.lora_B[name].weight * module.scaling[name]).to(
                        dtype
                    )  # [out, r], scale folded in
                    weights[name] = (a.t(), b.t().contiguous())
            layers.append((module, weights))
        return cls(model, layers)

    def _runs(self) -> list[tuple[str, int, int]]:
        runs: list[tuple[str, int, int]] = []
        for i, name in enumerate(self.rows):
            if runs and runs[-1][0] == name:
                runs[-1] = (name, runs[-1][1], i + 1)
            else:
                runs.append((name, i, i + 1))
        return runs

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Disables peft's own LoRA path and adds each run's update through forward hooks."""
        state: dict[str, Any] = {}

        def hook(
            module: Any, args: tuple[Any, ...], output: Any, weights: dict[str, tuple[Any, Any]]
        ) -> None:
            if state.get("rows") is not self.rows:
                state["rows"], state["runs"] = self.rows, self._runs()
            x = args[0]
            for name, start, stop in state["runs"]:
                if name in weights:
                    a_t, b_t = weights[name]
                    out = output[start:stop].view(-1, output.shape[-1])
                    out.addmm_(x[start:stop].reshape(-1, x.shape[-1]) @ a_t, b_t)

        handles = []
        try:
            with self.model.disable_adapter():
                for module, weights in self.layers:
                    handles.append(
                        module.register_forward_hook(lambda m, a, o, w=weights: hook(m, a, o, w))
                    )
                yield
        finally:
            for handle in handles:
                handle.remove()


def _cache_keyword(model: Any) -> str:
    """Returns the forward keyword that takes the KV cache (``cache`` in newer transformers)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _decode_batch(
    model: Any,
    prompts: list[Sequence[int]],
    groups: list[tuple[int, int]],
    adapter_names: list[str] | None,
    uniforms: Any | None,
    *,
    lora: _SegmentedLora | None,
    max_new_tokens: int,
    min_new_tokens: int,
    temperature: float,
    top_p: float,
    pad_id: int,
    eos_ids: list[int],
) -> list[list[int]]:
    """Returns each row's new tokens, cut before its first end token."""
    import torch

    from persona_geometry.kv_cache import GrowingCache, decode_attention
    from persona_geometry.prompts import left_pad

    device = next(model.parameters()).device
    n = len(prompts)
    # Prefill each distinct (adapter, prompt) once; its completions share the cache.
    distinct: dict[tuple[int, int], int] = {}
    for g in groups:
        distinct.setdefault(g, len(distinct))
    firsts = [groups.index(g) for g in distinct]
    expand = torch.tensor([distinct[g] for g in groups], device=device)
    ids, mask = left_pad([prompts[i] for i in firsts], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    extra: dict[str, Any] = {}
    cache = GrowingCache(model, capacity=ids.shape[1] + max_new_tokens)
    extra[_cache_keyword(model)] = cache
    names = list(adapter_names) if adapter_names is not None else None

    def set_rows(row_names: list[str] | None) -> None:
        if row_names is None:
            return
        if lora is not None:
            lora.rows = row_names
        else:
            extra["adapter_names"] = row_names

    set_rows(None if names is None else [names[i] for i in firsts])
    with (
        torch.inference_mode(),
        lora.applied() if lora is not None else nullcontext(),
        decode_attention(model),
    ):
        output = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        logits = output.logits[:, -1].index_select(0, expand)
        if len(distinct) < n:
            cache.batch_select_indices(expand)
        mask = mask.index_select(0, expand)
        positions = mask.sum(-1)  # the position of the next token
        eos = torch.tensor(eos_ids, device=device, dtype=torch.long) if eos_ids else None
        active = torch.arange(n, device=device)  # original row of each live row
        set_rows(names)
        result = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
        lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        noise = uniforms.to(device) if uniforms is not None else None
        for step in range(max_new_tokens):
            if eos is not None and step < min_new_tokens:
                logits[:, eos] = float("-inf")
            token = next_tokens(
                logits,
                None if noise is None else noise[:, step],
                temperature=temperature,
                top_p=top_p,
            )
            token = torch.where(done, torch.full_like(token, pad_id), token)
            result[active, step] = token
            if eos is not None:
                ended = torch.isin(token, eos) & ~done
                lengths[active] = torch.where(ended, step, lengths[active])
                done = done | ended
            if step == max_new_tokens - 1:
                break
            if eos is not None and step % _CHECK_EVERY == _CHECK_EVERY - 1:
                n_done = int(done.sum())
                if n_done == len(done):
                    break
                if n_done >= _COMPACT_FRACTION * len(done):
                    keep = (~done).nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    active, done, mask, positions, token = (
                        active[keep],
                        done[keep],
                        mask[keep],
                        positions[keep],
                        token[keep],
                    )
                    noise = noise[keep] if noise is not None else None
                    if names is not None:
                        names = [names[i] for i in keep.tolist()]
                        set_rows(names)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            output = model(
                input_ids=token.unsqueeze(-1),
                attention_mask=mask,
                position_ids=positions.unsqueeze(-1),
                use_cache=True,
                **extra,
            )
            logits = output.logits[:, -1]
            positions = positions + 1
    result, lengths = result.cpu(), lengths.cpu()
    return [result[i, : int(lengths[i])].tolist() for i in range(n)]
