"""Shared-prefix extraction: each persona's system block runs once, its questions reuse its KV
cache.

Every question of a persona starts with the same tokens (the system turn and the user header),
which make up about half of the study's prompt tokens. Where the packed engine
(``persona_geometry.packing``) cannot run, the ``hf`` engine's padded fallback with
``share_prefix=True`` runs each distinct prefix once, keeps its keys and values for the blocks
that are needed, and runs only the remaining suffix of each prompt against them. Attention then
sees exactly the keys it would see in a full forward (positions continue from the prefix), so
the last-token activations are the same function of the prompt; in float32 they agree with full
prompts to rounding (tests check ≤ 1e-5).

Layout of a suffix batch, per row (``P`` = longest prefix, ``S`` = longest suffix in the batch)::

    [pad … prefix tokens][pad … suffix tokens]
     ^ cached keys/values  ^ computed now; the last column is the prompt's last token

The attention mask marks the pads; position ids count real tokens only, so row ``i``'s
suffix starts at position ``len(prefix_i)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from persona_geometry.prompts import left_pad

__all__ = ["SharedPrefixes", "shared_prefixes", "prefix_engine"]

# Sharing pays only when the prefix is worth a forward of its own.
_MIN_PREFIX_TOKENS = 2


@dataclass(frozen=True)
class SharedPrefixes:
    """Prefixes shared by groups of prompts, and which prefix each prompt starts with.

    Attributes:
        prefixes: The distinct prefixes, as token-id tuples.
        of_prompt: For each prompt (by its full token ids), the index of its prefix.
    """

    prefixes: tuple[tuple[int, ...], ...]
    of_prompt: dict[tuple[int, ...], int]

    def prefix_for(self, ids: Sequence[int]) -> tuple[int, ...]:
        """Returns the prefix the prompt with these token ids starts with (maybe empty)."""
        return self.prefixes[self.of_prompt[tuple(ids)]]

    @property
    def saved_tokens(self) -> int:
        """Tokens a full-prompt forward would spend on prefixes beyond their first occurrence."""
        counts = [0] * len(self.prefixes)
        for i in self.of_prompt.values():
            counts[i] += 1
        return sum(len(p) * (c - 1) for p, c in zip(self.prefixes, counts, strict=True))


def shared_prefixes(groups: Sequence[Sequence[Sequence[int]]]) -> SharedPrefixes | None:
    """Returns the common token prefix of each group of prompts, or None if no group shares one.

    Each group (e.g. one persona's prompts) shares its longest common prefix, shortened so that
    every prompt keeps at least one token of its own: the last token, whose activations are
    recorded, must be computed in the suffix pass. Prompts of a group that shares nothing get
    the empty prefix (their whole prompt is the suffix).
    """
    prefixes: list[tuple[int, ...]] = []
    index: dict[tuple[int, ...], int] = {}
    of_prompt: dict[tuple[int, ...], int] = {}
    for group in groups:
        common: tuple[int, ...] = ()
        if len(group) >= 2:
            common = tuple(os.path.commonprefix([list(ids) for ids in group]))
            common = common[: min(len(ids) for ids in group) - 1]
        if len(common) < _MIN_PREFIX_TOKENS:
            common = ()
        i = index.setdefault(common, len(prefixes))
        if i == len(prefixes):
            prefixes.append(common)
        for ids in group:
            of_prompt[tuple(ids)] = i
    if not any(prefixes):
        return None
    return SharedPrefixes(prefixes=tuple(prefixes), of_prompt=of_prompt)


def _cache_kwarg(base: Any) -> str:
    # transformers 5.2x renamed the forward's `past_key_values` to `cache`; accept both.
    import inspect

    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _layer_kv(cache: Any, layer: int) -> tuple[Tensor, Tensor]:
    # transformers ≥ 4.56 keeps per-layer objects; older releases keep parallel lists.
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


@contextmanager
def prefix_engine(
    base: Any,
    recorder: Any,
    shared: SharedPrefixes,
    *,
    n_cached_layers: int,
    pad_id: int,
    device: torch.device,
    batch_tokens: int,
) -> Iterator[Any]:
    """Yields a batch function (full prompt ids in, ``{hook: [batch, layer, d_model]}`` out).

    On entry every prefix runs once (in token-budgeted batches, left-padded to the longest
    prefix so their caches stack), keeping keys and values of blocks ``0 .. n_cached_layers-1``.
    Each call then runs only the suffixes, against the stacked cache rows of their prefixes.

    Args:
        base: The decoder stack to call (no unembedding), e.g. ``model.model``.
        recorder: The ``LastTokenRecorder`` whose hooks sit on the blocks.
        shared: The prefixes and which prompt starts with which.
        n_cached_layers: Blocks whose keys and values are needed (the last requested + 1).
        pad_id: Any valid token id for padding (masked out).
        device: The model's device.
        batch_tokens: Token budget of one prefix batch.
    """
    cache_arg = _cache_kwarg(base)
    width = max(len(p) for p in shared.prefixes)
    keys: list[list[Tensor]] = [[] for _ in range(n_cached_layers)]
    values: list[list[Tensor]] = [[] for _ in range(n_cached_layers)]
    per_batch = max(1, batch_tokens // width)
    masks = []
    with torch.inference_mode():
        for start in range(0, len(shared.prefixes), per_batch):
            chunk = shared.prefixes[start : start + per_batch]
            ids, mask = left_pad(chunk, pad_id, width)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = _new_cache()
            ids, mask_d, positions = (t.to(device) for t in (ids, mask, positions))
            # The recorder's hooks fire and stop the forward after the last needed block; its
            # captures are discarded, the cache keeps every block it ran.
            recorder.run(
                lambda ids=ids, mask_d=mask_d, positions=positions, cache=cache: base(
                    input_ids=ids,
                    attention_mask=mask_d,
                    position_ids=positions,
                    use_cache=True,
                    **{cache_arg: cache},
                ),
                len(chunk),
            )
            for layer in range(n_cached_layers):
                k, v = _layer_kv(cache, layer)
                keys[layer].append(k)
                values[layer].append(v)
            masks.append(mask)
    prefix_k = [torch.cat(k, dim=0) for k in keys]
    prefix_v = [torch.cat(v, dim=0) for v in values]
    prefix_mask = torch.cat(masks, dim=0)
    prefix_len = prefix_mask.sum(-1)

    def forward(batch: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        rows = torch.as_tensor([shared.of_prompt[tuple(ids)] for ids in batch], dtype=torch.long)
        suffixes = [ids[len(shared.prefix_for(ids)) :] for ids in batch]
        s_ids, s_mask = left_pad(suffixes, pad_id)
        positions = prefix_len[rows].unsqueeze(-1) + (s_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([prefix_mask[rows], s_mask], dim=-1)
        rows_d = rows.to(device)
        cache = _new_cache()
        for layer in range(n_cached_layers):
            # With a device_map the blocks (and so their cached keys and values) sit on several
            # devices.
            r = (
                rows_d
                if prefix_k[layer].device == rows_d.device
                else rows.to(prefix_k[layer].device)
            )
            cache.update(
                prefix_k[layer].index_select(0, r), prefix_v[layer].index_select(0, r), layer
            )
        s_ids, mask, positions = (t.to(device, non_blocking=True) for t in (s_ids, mask, positions))
        with torch.inference_mode():
            return recorder.run(
                lambda: base(
                    input_ids=s_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{cache_arg: cache},
                ),
                len(batch),
            )

    yield forward
