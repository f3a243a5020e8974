"""Packed, padding-free extraction: prompts end to end in one sequence, each shared prefix once.

A *pack* is one sequence of at most ``budget`` tokens holding several persona groups. Each
group contributes its shared prefix (system turn and user header) once, followed by the
remaining suffix of each of its prompts::

    [prefix A][suffix A1][suffix A2]…[prefix B][suffix B1]…

A prefix-tree attention mask lets a prefix token see the earlier tokens of its prefix, and a
suffix token see its group's whole prefix and the earlier tokens of its own suffix, nothing
else. Position ids restart at 0 for each prefix and continue from it in each suffix, so every
prompt's last token sees exactly the keys and positions of a full, unpadded forward of that
prompt. Its activations are gathered by index. Nothing is padded between prompts, no key or
value is copied, and the compute is the unique tokens.

Every token's allowed keys are the union of two intervals of the pack, ``[lo1, hi1)`` (the
group's prefix, for a suffix token) and ``[lo2, q]`` (its own earlier tokens), which is all the
masks need:

- ``dense_mask``: a ``[1, 1, T, T]`` boolean (``sdpa``) or additive (``eager``) mask, for the
  CPU and for models without FlexAttention;
- ``block_mask``: a FlexAttention ``BlockMask`` computed block by block from the intervals
  (no ``T × T`` tensor is ever built), for GPUs: only the blocks near the diagonal run.

Packing is a pure function of the prompts and groups, so every rank of a sharded run plans the
same packs as one process and runs a share of them (``extract_activations`` under torchrun).
"""

from __future__ import annotations

import functools
import itertools
import os
import typing
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from persona_geometry._validation import check_positive_int, invalid

__all__ = [
    "BLOCK",
    "PACKED_FLEX_ATTENTION",
    "PACKED_PATHS",
    "Pack",
    "PackPlan",
    "Segment",
    "block_mask",
    "build_pack",
    "compiled_blocks",
    "dense_mask",
    "group_prefix_lengths",
    "hidden_size",
    "pack_budget",
    "packed_engine",
    "packed_flex_attention",
    "packed_path",
    "plan_packs",
    "pretrained_model",
    "rows_only",
    "split_across_devices",
    "use_attention",
]

# FlexAttention's block size (tile of the block mask); pack budgets are multiples of it.
BLOCK = 128
# Sharing pays only when the prefix is worth a copy of its own.
_MIN_PREFIX_TOKENS = 2


@dataclass(frozen=True)
class Segment:
    """One group's part of a pack: its prefix length and the prompts whose suffixes follow it."""

    prefix_len: int
    prompts: tuple[int, ...]


@dataclass(frozen=True)
class PackPlan:
    """The segments of one pack and its token count before padding."""

    segments: tuple[Segment, ...]
    n_tokens: int

    @property
    def prompts(self) -> list[int]:
        """The prompts of the pack, in the order their last tokens are gathered."""
        return [i for seg in self.segments for i in seg.prompts]


@dataclass(frozen=True)
class Pack:
    """One packed sequence, ready for a forward.

    Attributes:
        input_ids: ``[1, T]`` token ids (``T`` a multiple of ``pad_to``, by default the tokens).
        position_ids: ``[1, T]`` positions: from 0 in each prefix, continuing from it in each
        suffix.
        lo1, hi1, lo2: ``[T]`` interval bounds: token ``q`` attends to keys in ``[lo1, hi1)`` and
        ``[lo2, q]``.
        last: ``[n]`` index of each prompt's last token, in the order of ``prompts``.
        prompts: The prompt positions (into the ``ids`` given to ``plan_packs``).
        n_real: Tokens before the trailing padding.
    """

    input_ids: Int[Tensor, "1 T"]
    position_ids: Int[Tensor, "1 T"]
    lo1: Int[Tensor, " T"]
    hi1: Int[Tensor, " T"]
    lo2: Int[Tensor, " T"]
    last: Int[Tensor, " n"]
    prompts: tuple[int, ...]
    n_real: int

    @property
    def length(self) -> int:
        """Tokens in the pack, padding included."""
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> Pack:
        """Returns the pack with its tensors on ``device``.

        To a GPU the tensors go through page-locked memory without waiting: a pageable copy would
        make the host wait for the previous pack's forward, leaving the GPU idle while the next
        pack is built.
        """
        names = ("input_ids", "position_ids", "lo1", "hi1", "lo2", "last")
        moved = _to_device([getattr(self, k) for k in names], device)
        return Pack(
            **dict(zip(names, moved, strict=True)), prompts=self.prompts, n_real=self.n_real
        )


def _to_device(
    tensors: Sequence[Tensor], device: torch.device | str, *, together: bool | None = None
) -> list[Tensor]:
    """Returns ``tensors`` on ``device``; from the host to a GPU as one copy per dtype through a
    page-locked buffer, without waiting (from pageable memory a copy waits for the work queued
    before it, and each small copy cost ~80 µs of host time before the built-in study's one
    forward could start). ``together`` forces (or avoids) the single copy on any device.

    Each tensor comes back as a tensor of its own, not a view into the copied buffer:
    torch.compile specialises a storage offset of 0 or 1, so views at varying offsets
    recompiled the blocks (8 s inside a timed call on the H200).
    """
    cuda = torch.device(device).type == "cuda"
    on_host = all(t.device.type == "cpu" for t in tensors)
    if not (together if together is not None else cuda and on_host):
        return [t.to(device) for t in tensors]
    moved: list[Tensor | None] = [None] * len(tensors)
    for dtype in {t.dtype for t in tensors}:
        which = [k for k, t in enumerate(tensors) if t.dtype == dtype]
        sizes = [tensors[k].numel() for k in which]
        host = torch.empty(sum(sizes), dtype=dtype, pin_memory=cuda and on_host)
        torch.cat([tensors[k].reshape(-1) for k in which], out=host)
        flat = host.to(device, non_blocking=True)
        for k, piece in zip(which, flat.split(sizes), strict=True):
            moved[k] = piece.view(tensors[k].shape).clone()
    return moved  # type: ignore[return-value]


def group_prefix_lengths(
    ids: Sequence[Sequence[int]], groups: Sequence[Sequence[int]]
) -> list[int]:
    """Returns each group's shared prefix length: the longest common prefix, leaving every prompt a
    token.

    The last token of each prompt is gathered from its suffix, so the prefix stops at least one
    token short of the group's shortest prompt. A group of one prompt, or one whose common
    prefix is under 2 tokens, shares nothing (0).
    """
    lengths = []
    for group in groups:
        n = 0
        if len(group) >= 2:
            # Of the lexicographically first and last prompts (what commonprefix compares), as
            # given: copying every prompt to a list took 10 ms for 1,500 long prompts. (Bisecting
            # on slices, as prompts.common_prefix does for texts, gained nothing here: finding
            # the first and last prompts is most of the time.)
            first = min(ids[i] for i in group)
            last = max(ids[i] for i in group)
            n = len(os.path.commonprefix([first, last]))
            n = min(n, min(len(ids[i]) for i in group) - 1)
        lengths.append(n if n >= _MIN_PREFIX_TOKENS else 0)
    return lengths


def plan_packs(
    ids: Sequence[Sequence[int]],
    groups: Sequence[Sequence[int]],
    prefix_lens: Sequence[int],
    budget: int,
    max_prompts: int | None = None,
) -> list[PackPlan]:
    """Returns packs of whole groups where they fit, each within ``budget`` tokens.

    Groups go in order: a group that fits the current pack joins it, one that does not starts
    a new pack, and one larger than a whole pack is split into pieces, each repeating the prefix
    (a prompt whose prefix and suffix alone exceed the budget gets a pack of its own).

    Args:
        ids: Token ids of every prompt.
        groups: Positions into ``ids``; the prompts of a group share its prefix.
        prefix_lens: Each group's shared prefix length (``group_prefix_lengths``; 0 for none).
        budget: Most tokens in one pack.
        max_prompts: Most prompts in one pack; unlimited by default.
    """
    budget = check_positive_int(budget, "budget", "plan_packs")
    if len(prefix_lens) != len(groups):
        invalid(
            "prefix_lens", "plan_packs", f"one length per group ({len(groups)})", len(prefix_lens)
        )
    packs: list[PackPlan] = []
    segments: list[Segment] = []
    used = 0
    count = 0

    def close() -> None:
        nonlocal segments, used, count
        if segments:
            packs.append(PackPlan(tuple(segments), used))
        segments, used, count = [], 0, 0

    for group, plen in zip(groups, prefix_lens, strict=True):
        if not group:
            continue
        suffix = [len(ids[i]) - plen for i in group]
        size = plen + sum(suffix)
        fits_prompts = max_prompts is None or count + len(group) <= max_prompts
        if used + size <= budget and fits_prompts:
            segments.append(Segment(plen, tuple(group)))
            used, count = used + size, count + len(group)
            continue
        close()
        piece: list[int] = []
        piece_used = plen
        for i, s in zip(group, suffix, strict=True):
            full = max_prompts is not None and len(piece) >= max_prompts
            if piece and (piece_used + s > budget or full):
                segments.append(Segment(plen, tuple(piece)))
                used, count = piece_used, len(piece)
                close()
                piece, piece_used = [], plen
            piece.append(i)
            piece_used += s
        segments.append(Segment(plen, tuple(piece)))
        used, count = piece_used, len(piece)
    close()
    return packs


def build_pack(
    ids: Sequence[Sequence[int]], plan: PackPlan, *, pad_id: int, pad_to: int = 1
) -> Pack:
    """Returns the tensors of one planned pack, padded at the end to a multiple of ``pad_to``.

    No padding by default: every attention path takes any length (``block_mask`` handles a
    last, partial tile), and padding to FlexAttention's 128-token tiles cost the built-in study
    2% more tokens. A padding token attends to itself only; nothing attends to it.
    """
    # Runs of tokens in pack order (each prefix, then each suffix of its group), with what every
    # token of a run shares: its group's start and prefix end, and the position it starts at.
    runs: list[Sequence[int]] = []
    group_start: list[int] = []
    prefix_end: list[int] = []
    first_position: list[int] = []
    last: list[int] = []
    n = 0
    for seg in plan.segments:
        start, end_prefix = n, n + seg.prefix_len
        if seg.prefix_len:
            runs.append(ids[seg.prompts[0]][: seg.prefix_len])
            group_start.append(start)
            prefix_end.append(start)  # a prefix token sees its own earlier tokens only
            first_position.append(0)
            n = end_prefix
        for i in seg.prompts:
            suffix = ids[i][seg.prefix_len :]
            runs.append(suffix)
            group_start.append(start)
            prefix_end.append(end_prefix)
            first_position.append(seg.prefix_len)
            n += len(suffix)
            last.append(n - 1)
    n_real = n
    total = -(-max(n_real, 1) // pad_to) * pad_to
    # Vectorised: converting Python lists to tensors took longer than building them.
    lengths = np.fromiter(map(len, runs), dtype=np.int64, count=len(runs))
    run_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pad = np.arange(n_real, total)
    tokens = np.fromiter(itertools.chain.from_iterable(runs), dtype=np.int64, count=n_real)
    positions = np.arange(n_real) - run_start + np.repeat(first_position, lengths)
    lo1 = np.repeat(np.asarray(group_start, dtype=np.int64), lengths)
    hi1 = np.repeat(np.asarray(prefix_end, dtype=np.int64), lengths)
    as_long = lambda *parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))  # noqa: E731
    return Pack(
        input_ids=as_long(tokens, np.full(len(pad), pad_id)).unsqueeze(0),
        position_ids=as_long(positions, np.zeros(len(pad))).unsqueeze(0),
        lo1=as_long(lo1, pad),
        hi1=as_long(hi1, pad),
        lo2=as_long(run_start, pad),
        last=as_long(np.asarray(last)),
        prompts=tuple(plan.prompts),
        n_real=n_real,
    )


def dense_mask(pack: Pack, *, additive_dtype: torch.dtype | None = None) -> Tensor:
    """Returns the pack's ``[1, 1, T, T]`` attention mask: boolean (True = attend), or additive in
    ``additive_dtype``."""
    q = torch.arange(pack.length, device=pack.lo1.device)
    kv = q.unsqueeze(0)
    allowed: Bool[Tensor, "T T"] = ((kv >= pack.lo1[:, None]) & (kv < pack.hi1[:, None])) | (
        (kv >= pack.lo2[:, None]) & (kv <= q[:, None])
    )
    allowed = allowed[None, None]
    if additive_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=additive_dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(additive_dtype).min)


def _tiled_intervals(pack: Pack, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns ``lo1, hi1, lo2`` on the host, extended to a whole number of tiles by tokens that
    see only themselves (FlexAttention may evaluate the mask past the end of a last, partial
    tile)."""
    T = pack.length
    extra = np.arange(T, -(-T // block) * block)
    return tuple(np.concatenate([x.cpu().numpy(), extra]) for x in (pack.lo1, pack.hi1, pack.lo2))  # type: ignore[return-value]


def _tile_counts(lo1: np.ndarray, hi1: np.ndarray, lo2: np.ndarray, block: int) -> np.ndarray:
    """``block_counts`` on the host arrays of ``_tiled_intervals``: ``[q_block, kv_block]``."""
    T = len(lo1)
    nb = T // block
    q = np.arange(T)
    # A token's keys lie between its group's start and itself: only the key tiles from its
    # first key's tile to its own are counted ([T, span] instead of [T, T / block]).
    first_tile = np.minimum(lo1, lo2) // block
    span = int((q // block - first_tile).max()) + 1
    j = first_tile[:, None] + np.arange(span)[None, :]
    j0, j1 = j * block, j * block + block
    first = np.maximum(np.minimum(hi1[:, None], j1) - np.maximum(lo1[:, None], j0), 0)
    own = np.maximum(np.minimum(q[:, None] + 1, j1) - np.maximum(lo2[:, None], j0), 0)
    # Tiles past the last one hold no key of the token (a count of 0): any index will do.
    cell = (q // block)[:, None] * nb + np.minimum(j, nb - 1)
    return (
        np.bincount(cell.ravel(), weights=(first + own).ravel(), minlength=nb * nb)
        .astype(np.int64)
        .reshape(nb, nb)
    )


def block_counts(pack: Pack, block: int = BLOCK) -> Int[Tensor, "q_block kv_block"]:
    """Returns how many (query, key) pairs each ``block × block`` tile of the mask allows.

    Computed from the intervals, one ``[T, span]`` pass over the key tiles each token's keys
    can reach (from its group's start to itself): a tile is full when it allows ``block²``
    pairs, empty at 0. A pack whose length is no multiple of ``block`` counts its last,
    partial tiles as if tokens that see only themselves filled them: never full. Counted on the
    host (a few dozen small array operations: NumPy's are several times cheaper than torch's,
    and a GPU pack would make the host wait to read its span); returned where the pack is.
    """
    counts = _tile_counts(*_tiled_intervals(pack, block), block)
    return torch.from_numpy(counts).to(pack.lo1.device)


def block_mask(pack: Pack, block: int = BLOCK, *, device: torch.device | str | None = None):  # noqa: ANN201 (BlockMask: imported lazily)
    """Returns the pack's mask as a FlexAttention ``BlockMask``: full tiles, partial tiles and a
    ``mask_mod``.

    Only tiles that allow some pair are listed; full tiles skip the ``mask_mod``. The tiles are
    listed on the host, and the mask's tensors go where the pack is, or to ``device`` (to a GPU
    as one copy without waiting: listing a host pack's tiles launches no kernels, which took 3
    ms of host time before the built-in study's one forward could start). Forward only: the
    mask lists no tiles by query for a backward pass where torch allows leaving them out.
    """
    from torch.nn.attention.flex_attention import BlockMask

    lo1, hi1, lo2 = _tiled_intervals(pack, block)
    counts = _tile_counts(lo1, hi1, lo2, block)
    full = counts == block * block
    partial = (counts > 0) & ~full

    def listing(m: np.ndarray) -> tuple[Tensor, Tensor]:
        num = m.sum(-1).astype(np.int32)
        # Listed tiles first, in increasing key order (a stable sort of "not listed").
        idx = np.argsort(~m, axis=-1, kind="stable").astype(np.int32)
        return torch.from_numpy(num[None, None]), torch.from_numpy(idx[None, None])

    kv_num, kv_idx = listing(partial)
    full_num, full_idx = listing(full)
    # int32 like the tile lists: one copy to the device for all seven.
    tensors = [kv_num, kv_idx, full_num, full_idx] + [
        torch.from_numpy(x.astype(np.int32)) for x in (lo1, hi1, lo2)
    ]
    target = device if device is not None else pack.lo1.device
    kv_num, kv_idx, full_num, full_idx, lo1_t, hi1_t, lo2_t = _to_device(tensors, target)

    # Left alone by type-checking import hooks (the test suite's jaxtyping): FlexAttention traces
    # the function and refuses a wrapper's side effects.
    @typing.no_type_check
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ((kv_idx >= lo1_t[q_idx]) & (kv_idx < hi1_t[q_idx])) | (
            (kv_idx >= lo2_t[q_idx]) & (kv_idx <= q_idx)
        )

    forward_only = {"compute_q_blocks": False} if _can_skip_q_blocks() else {}
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(pack.length, pack.length),
        **forward_only,
    )


@functools.cache
def _can_skip_q_blocks() -> bool:
    import inspect

    from torch.nn.attention.flex_attention import BlockMask

    return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


# --- engine ----------------------------------------------------------------------------------
PACKED_PATHS: tuple[str, ...] = ("packed_flex", "packed_sdpa", "packed_eager")


def pretrained_model(model: Any) -> Any:
    """Returns the Hugging Face ``PreTrainedModel`` inside ``model`` (itself, or a peft model's
    base)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return False
    return True


def packed_path(model: Any, device: torch.device) -> str | None:
    """Returns the packed attention path the model can run on ``device``, or None when it cannot.

    A packed forward passes its own 4D mask, which reaches the attention of models built on
    transformers' attention interface and mask functions (``create_causal_mask``): FlexAttention
    with a ``BlockMask`` on a GPU when the model supports it, else a dense mask for ``sdpa`` or
    ``eager`` attention. Models with other attention (flash-attention kernels without custom
    masks, remote code) return None, and extraction falls back to the padded engines.
    """
    pm = pretrained_model(model)
    config = getattr(pm, "config", None)
    can_set = getattr(type(pm), "_can_set_attn_implementation", None)
    if (
        config is None
        or not callable(can_set)
        or not can_set()
        or not _uses_mask_functions(type(pm))
    ):
        return None
    impl = getattr(config, "_attn_implementation", None)
    # A BlockMask is no tensor: accelerate's hooks cannot move it to the device of each block, so
    # a model split across devices (``device_map``) takes a dense mask, which they move.
    split = split_across_devices(pm)
    flex = getattr(pm, "_supports_flex_attn", False) and _flex_available() and not split
    if (impl == "flex_attention" and not split) or (device.type == "cuda" and flex):
        return "packed_flex"
    if impl in ("sdpa", "eager"):
        return f"packed_{impl}"
    if getattr(pm, "_supports_sdpa", False):
        return "packed_sdpa"
    return None


def split_across_devices(model: Any) -> bool:
    """Returns whether a ``device_map`` placed the model's modules on more than one device."""
    placement = getattr(pretrained_model(model), "hf_device_map", None) or {}
    return len({str(d) for d in placement.values()}) > 1


@functools.cache
def _uses_mask_functions(cls: type) -> bool:
    # A 4D mask passes through transformers' mask functions unchanged; a model that builds its
    # own masks would mangle it.
    import inspect
    import sys

    try:
        return "create_causal_mask" in inspect.getsource(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return False


def hidden_size(config: Any) -> int:
    """Returns a Hugging Face config's model width (``hidden_size``, or GPT-2's ``n_embd``)."""
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def pack_budget(
    config: Any,
    dtype: torch.dtype,
    path: str,
    memory_bytes: float,
    *,
    cap: int | None = None,
) -> int:
    """Returns the most tokens one pack may hold for its forward to stay within ``memory_bytes``.

    Per token a decoder block keeps about three MLP-wide and eight model-wide activations alive
    (the residual stream, the normed input, queries, keys, values, the attention output, and the
    MLP's gate, up and product); a dense mask adds ``T²`` terms (the mask, its float copy, and
    for ``eager`` the per-head scores), and computes attention over all ``T²`` pairs, so dense
    packs are also capped at ``max(1024, 2 × (d_model + d_mlp))`` tokens. The result is a
    multiple of ``BLOCK``, at least one block.
    """
    d = hidden_size(config)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1))
    elem = torch.tensor([], dtype=dtype).element_size()
    linear = elem * (3 * int(inner) + 8 * d)
    quad = {"packed_flex": 0, "packed_sdpa": 1 + elem, "packed_eager": 1 + elem + 2 * heads * elem}[
        path
    ]
    if quad:
        tokens = (-linear + (linear * linear + 4 * quad * memory_bytes) ** 0.5) / (2 * quad)
        # A dense mask computes every pair of the pack: keep that within a fraction of the
        # linear layers' work (measured on the CPU: 1024 tokens cost a tiny model 25% more
        # time than the shared-prefix engine, 4096 tokens 60%).
        tokens = min(tokens, max(1024, 2 * (d + int(inner))))
    else:
        tokens = memory_bytes / linear
    tokens = int(tokens) // BLOCK * BLOCK
    if cap is not None:
        tokens = min(tokens, -(-cap // BLOCK) * BLOCK)
    return max(BLOCK, tokens)


# The attention implementation of the packed_flex path, registered with transformers.
PACKED_FLEX_ATTENTION = "persona_geometry_flex"


@functools.cache
def packed_flex_attention() -> str:
    """Registers the packed_flex path's attention with transformers and returns its name.

    It is transformers' ``flex_attention`` without its copy of the keys and values: for a head
    count that is no power of two (28 query heads over 4 key/value heads on a 7B Qwen2),
    transformers repeats each key/value head for its query heads (``repeat_kv``) before
    FlexAttention, where FlexAttention's own grouped-query attention reads them in place. The
    same values to the bit, and one copy of every layer's keys and values less
    (``benchmarks/extract_gpu.py``: long prompts 2.586 -> 2.571 s on an H200). What this path
    never passes (a logit soft-cap, attention sinks, a position bias, dropout, a mask that is no
    ``BlockMask``) goes to transformers' own function.
    """
    from torch.nn.attention.flex_attention import BlockMask
    from transformers import AttentionInterface
    from transformers.integrations.flex_attention import (
        compile_friendly_flex_attention,
        flex_attention_forward,
    )

    def attention(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        softcap: float | None = None,
        s_aux: Tensor | None = None,
        position_bias: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        plain = (
            softcap is None
            and s_aux is None
            and position_bias is None
            and not kwargs.get("dropout")
            and not module.training
            and isinstance(attention_mask, BlockMask)
            and query.shape[1] % key.shape[1] == 0
        )
        if not plain:
            return flex_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                s_aux=s_aux, position_bias=position_bias, **kwargs,
            )  # fmt: skip
        out = compile_friendly_flex_attention(
            query,
            key,
            value,
            block_mask=attention_mask,
            enable_gqa=query.shape[1] != key.shape[1],
            scale=scaling,
            training=False,
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(PACKED_FLEX_ATTENTION, attention)
    return PACKED_FLEX_ATTENTION


# Models whose attention implementations were switched before, with those implementations: a
# model that has one config for all its parts switches again by setting it on that config.
_SWITCHED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


@contextmanager
def use_attention(model: Any, implementation: str) -> Iterator[None]:
    """Switches the model to an attention implementation for the ``with`` block, then back.

    The first switch of a model to an implementation goes through ``set_attn_implementation``
    (which checks the implementation is available and walks every submodule: 0.5 ms on a
    28-block model, each way, every call). A model whose parts all share its one config (the
    decoder-only models) is switched from then on by setting that config's implementation, as
    ``set_attn_implementation`` itself does.
    """
    pm = pretrained_model(model)
    before = pm.config._attn_implementation
    if before == implementation:
        yield
        return
    switched = _SWITCHED.get(pm)
    if switched is not None and {implementation, before} <= switched:
        pm.config._attn_implementation_internal = implementation
        try:
            yield
        finally:
            pm.config._attn_implementation_internal = before
        return
    pm.set_attn_implementation(implementation)
    exact = pm.config._attn_implementation == implementation  # not adjusted by transformers
    try:
        yield
    finally:
        pm.set_attn_implementation(before)
        if exact and _one_config(pm):
            _SWITCHED.setdefault(pm, set()).update((implementation, before))


def _one_config(pm: Any) -> bool:
    """Returns whether every part of the model reads its attention implementation from its one
    config: no sub-configs, every ``PreTrainedModel`` inside holding that same config."""
    from transformers import PreTrainedModel

    config = pm.config
    return (
        not getattr(config, "sub_configs", None)
        and hasattr(config, "_attn_implementation_internal")
        and all(m.config is config for m in pm.modules() if isinstance(m, PreTrainedModel))
    )


# One compiled block forward per block class, shared by every block and every call, so it
# compiles once per process (and once more when pack lengths first vary).
_COMPILED: dict[type, Any] = {}


def _is_transformers_hook(hook: Any) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial
    return str(getattr(fn, "__module__", "") or "").startswith("transformers.")


@contextmanager
def _without_transformers_hooks(blocks: Sequence[Any]) -> Iterator[None]:
    """Detaches the forward hooks transformers puts on the blocks' submodules, for the ``with``
    block.

    transformers records ``output_attentions`` and the like through forward hooks on the
    attention and MLP modules that read a ``ContextVar``. They do nothing unless the caller asks
    for those outputs (a packed forward never does), but ``torch.compile`` cannot trace
    ``ContextVar.get``: each hook split every compiled block into three graphs, and the
    norms and residual adds around the splits ran unfused (``benchmarks/extract_gpu.py``). Other
    hooks (this package's recorder, a user's) stay.
    """
    # (table, its hooks in their original order) for every table a hook was taken from.
    touched: list[tuple[Any, list[tuple[int, Any]]]] = []
    try:
        # The blocks' own hooks run outside the compiled forward: their submodules only, walked
        # by hand (Module.modules() took 0.4 ms for the 364 of a 28-block model, every call).
        stack = [m for block in blocks for m in block._modules.values()]
        while stack:
            module = stack.pop()
            if module is None:
                continue
            stack.extend(module._modules.values())
            if module._forward_hooks or module._forward_pre_hooks:
                for table in (module._forward_hooks, module._forward_pre_hooks):
                    if any(_is_transformers_hook(h) for h in table.values()):
                        touched.append((table, list(table.items())))
                        for key, hook in list(table.items()):
                            if _is_transformers_hook(hook):
                                del table[key]
        yield
    finally:
        # The taken hooks back in their places (a hook registered with prepend=True stays first);
        # hooks others added or removed meanwhile stay added or removed.
        for table, items in touched:
            taken = {k: h for k, h in items if _is_transformers_hook(h)}
            current = {**dict(table), **taken}
            order = [k for k, _ in items]
            merged = [(k, current.pop(k)) for k in order if k in current]
            table.clear()
            table.update(merged)
            table.update(current)  # added meanwhile: after the others


@contextmanager
def compiled_blocks(blocks: Sequence[Any]) -> Iterator[None]:
    """Runs each block's ``forward`` through ``torch.compile`` (dynamic shapes) in the ``with``
    block.

    Only the block's own ``forward`` is compiled: the forward hooks that record activations and
    stop the forward run outside it, and transformers' output-capturing hooks on the blocks'
    submodules are detached meanwhile (``_without_transformers_hooks``), so each block is one
    graph. One compiled function serves every block of a class; the blocks get their plain
    ``forward`` and their hooks back on exit.
    """
    installed = []
    with _without_transformers_hooks(blocks):
        try:
            for block in blocks:
                cls = type(block)
                if cls not in _COMPILED:
                    _COMPILED[cls] = torch.compile(cls.forward, dynamic=True)
                block.forward = functools.partial(_COMPILED[cls], block)
                installed.append(block)
            yield
        finally:
            for block in installed:
                block.__dict__.pop("forward", None)


class _RowsOnly(torch.nn.Module):
    """A token-wise module (a decoder block's MLP) run on chosen positions of its input only.

    ``rows`` (set before each forward) are positions along the input's token axis
    (``-2``); the output has the inner module's output at those positions and zeros elsewhere.
    A compiled block reads the rows as an input with a dynamic length: new rows each pack
    compile nothing.
    """

    rows: Int[Tensor, " n"]

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        # A plain attribute: torch.compile gives the buffers of a module static shapes.
        self.rows = torch.zeros(0, dtype=torch.long)

    def set_rows(self, rows: Int[Tensor, " n"]) -> None:
        """Sets the positions the next forward runs on (their count may change every pack)."""
        # One row, repeated: torch.compile specialises a length of 1 (a recompile of the block
        # for a pack of one prompt), and the same row twice gives the same values.
        self.rows = rows.repeat(2) if rows.numel() == 1 else rows

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = self.rows.to(x.device, non_blocking=True)
        y = self.inner(x.index_select(-2, rows), *args, **kwargs)
        first = y[0] if isinstance(y, tuple) else y
        out = first.new_zeros((*x.shape[:-1], first.shape[-1])).index_copy_(-2, rows, first)
        return (out, *y[1:]) if isinstance(y, tuple) else out


@contextmanager
def rows_only(block: Any) -> Iterator[_RowsOnly | None]:
    """Runs ``block``'s MLP on chosen token positions only, for the ``with`` block.

    Yields the wrapper now in ``block.mlp`` (``set_rows`` before each forward), or None
    when the block has no ``mlp`` module. For the last block a packed forward reads: its output
    is read at the prompts' last tokens only, and the MLP is token-wise, so those rows are
    exact while the others (left as the residual stream plus zero) are never read. That skips
    the MLP for every other token of the block, most of its FLOPs (on a 7B model 87%, a 28th
    of the whole forward's); its attention still runs for every token, whose keys and values
    the last tokens attend to. The block gets its MLP back on exit.
    """
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, torch.nn.Module) or isinstance(mlp, _RowsOnly):
        yield None
        return
    block.mlp = _RowsOnly(mlp)
    try:
        yield block.mlp
    finally:
        block.mlp = mlp


@contextmanager
def packed_engine(
    model: Any,
    base: Any,
    recorder: Any,
    *,
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    compile_blocks: Sequence[Any] = (),
    last_block: Any = None,
) -> Iterator[Any]:
    """Yields a forward of one ``Pack``: ``{hook: [prompt, layer, d_model]}`` in ``pack.prompts``
    order (``forward(pack, on_layer=None)``; ``on_layer`` as in ``LastTokenRecorder.run``).

    The model runs with the path's attention implementation (switched back on exit).

    Args:
        model: The model (a Hugging Face model or a peft model around one).
        base: The decoder stack to call (no unembedding), e.g. ``model.model``.
        recorder: The ``LastTokenRecorder`` whose hooks sit on the blocks.
        path: One of ``PACKED_PATHS`` (``packed_path``).
        device: The model's device.
        dtype: The model's dtype (the additive mask of ``eager`` attention is in it).
        compile_blocks: Blocks to run through ``torch.compile`` (``compiled_blocks``); none by
        default.
        last_block: The block whose output is the last one the recorder reads, when it reads
        that output (not only its input) and stops the forward there: its MLP runs on the
        prompts' last tokens only (``rows_only``).
    """
    if path not in PACKED_PATHS:
        invalid("path", "packed_engine", f"one of {list(PACKED_PATHS)}", path)
    implementation = {
        "packed_flex": packed_flex_attention(),
        "packed_sdpa": "sdpa",
        "packed_eager": "eager",
    }[path]

    def forward(
        pack: Pack, on_layer: Callable[[int, dict[str, Tensor]], None] | None = None
    ) -> dict[str, Tensor]:
        if path == "packed_flex":
            mask = block_mask(pack, device=device)  # listed on the host, no kernels
        p = pack.to(device)
        if path != "packed_flex":
            mask = dense_mask(p, additive_dtype=dtype if path == "packed_eager" else None)
        if trimmed is not None:
            trimmed.set_rows(p.last)
        with torch.inference_mode():
            return recorder.run(
                lambda: base(
                    input_ids=p.input_ids,
                    attention_mask=mask,
                    position_ids=p.position_ids,
                    use_cache=False,
                ),
                len(p.prompts),
                index=p.last,
                on_layer=on_layer,
            )

    with (
        use_attention(model, implementation),
        compiled_blocks(compile_blocks),
        rows_only(last_block) if last_block is not None else nullcontext() as trimmed,
    ):
        yield forward
