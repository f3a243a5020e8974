"""Ranks and world size of a ``torchrun`` launch, and extraction sharded across its ranks.

``torchrun --nproc-per-node N`` starts N copies of a program with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set. This module reads them, starts the process group (gloo, plus NCCL for CUDA
tensors where there is a GPU), pins each rank to its own GPU, and shards an extraction by
persona groups: rank ``r`` of ``N`` extracts one contiguous block of the personas (whole
persona groups, so the shared system-prompt prefix still pays), and the blocks are gathered in
rank order, which is persona order, into one ``ActivationSet`` on every rank.

``local_only()`` makes a rank behave as a single process for a while: ``world_size()`` reads
1, and the launcher's variables are hidden from libraries that read them (transformers'
``Trainer`` would otherwise wrap an independent adapter's model in DDP).
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "barrier",
    "block_of",
    "extract_across_ranks",
    "init_process_group",
    "local_only",
    "local_rank",
    "pin_local_device",
    "rank",
    "world_size",
]

log = logging.getLogger(__name__)

# The variables a launcher (torchrun, accelerate, MPI) sets and libraries read to go distributed.
_LAUNCHER_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
)  # fmt: skip
# Units can run for hours while other ranks wait at a barrier: far above torch's 30-minute default.
_TIMEOUT = _dt.timedelta(days=7)
_local = contextvars.ContextVar("persona_geometry_local_only", default=False)


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Returns the number of ranks: the group's size, else ``WORLD_SIZE``, else 1.

    Inside ``local_only`` it is 1.
    """
    if _local.get():
        return 1
    d = _dist()
    return d.get_world_size() if d is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    """Returns this process's rank: the group's, else ``RANK``, else 0 (0 inside ``local_only``)."""
    if _local.get():
        return 0
    d = _dist()
    return d.get_rank() if d is not None else int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    """Returns this process's rank on its node (``LOCAL_RANK``), 0 when not launched by torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def init_process_group() -> bool:
    """Returns whether a process group is up, starting one from the launcher's variables if needed.

    The group is gloo for CPU tensors (and the study's barriers), plus NCCL for CUDA tensors when
    a GPU is present, so one adapter can also train with DDP across the ranks.
    """
    import torch.distributed as dist

    if _dist() is not None:
        return True
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not dist.is_available():
        return False
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=_TIMEOUT)
    log.info(
        "rank %d of %d: process group up (%s)", dist.get_rank(), dist.get_world_size(), backend
    )
    return True


def pin_local_device() -> None:
    """Shows each rank only its own GPU (``CUDA_VISIBLE_DEVICES``), so ``"cuda"`` means that GPU.

    Must run before CUDA starts in the process (asking torch how many GPUs there are would
    start it, so the GPUs are read from ``CUDA_VISIBLE_DEVICES``, else taken to be numbered from
    0); a no-op without a launcher, with one GPU per rank already, or once CUDA is up.
    """
    if "LOCAL_RANK" not in os.environ or torch.cuda.is_initialized():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank())
    elif len(ids := visible.split(",")) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local_rank() % len(ids)]


def barrier() -> None:
    """Waits for every rank (a no-op in one process or inside ``local_only``)."""
    d = _dist()
    if d is not None and not _local.get():
        d.barrier()


@contextmanager
def local_only() -> Iterator[None]:
    """Runs the block as if this rank were the only process (see the module docstring)."""
    saved = {k: os.environ.pop(k) for k in _LAUNCHER_VARS if k in os.environ}
    token = _local.set(True)
    try:
        yield
    finally:
        _local.reset(token)
        os.environ.update(saved)


def block_of(n_items: int, n_blocks: int, index: int) -> range:
    """Returns block ``index`` of ``n_blocks`` contiguous, near-equal blocks of ``range(n_items)``.

    The first ``n_items % n_blocks`` blocks are one longer.
    """
    base, extra = divmod(n_items, n_blocks)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def extract_across_ranks(
    extract: Callable[..., Any],
    model: Any,
    personas: Any,
    questions: Sequence[str] | None,
    **kwargs: Any,
) -> Any:
    """Returns ``extract(model, personas, questions, **kwargs)``, in persona blocks across ranks.

    Rank ``r`` of ``N`` extracts the ``r``-th contiguous block of personas (in one process, as
    usual: its cache entry and chunked resume are its own, keyed by its personas), and the blocks
    are gathered in rank order. Every rank returns the same, whole ``ActivationSet``: its
    tensors, labels and token counts equal a single-process run's; its manifest is rank 0's
    with the whole set's persona hash and prompt count, plus ``ranks`` (the world size) and
    ``shards`` (each block's cache key).
    """
    import torch.distributed as dist

    from persona_geometry.activations import ActivationSet
    from persona_geometry.personas import PersonaSet
    from persona_geometry.store import cache_key

    n, r = world_size(), rank()
    block = block_of(len(personas), n, r)
    part = None
    if len(block):
        log.info(
            "rank %d of %d: extracting personas %d-%d of %d",
            r,
            n,
            block.start,
            block.stop - 1,
            len(personas),
        )
        with local_only():
            part = extract(model, PersonaSet(personas[i] for i in block), questions, **kwargs)
    # Labels and shapes travel as objects; the tensors as raw bytes through the tensor backend
    # (NCCL between GPUs: pickling ~70 MB of activations through gloo took ~0.8 s on 2 H200s).
    meta = (
        None
        if part is None
        else (
            {h: (tuple(part[h].shape), part[h].dtype) for h in part.hooks},
            part.n_tokens,
            part.manifest,
            part.layers,
            part.questions,
        )
    )
    gathered: list[Any] = [None] * n
    dist.all_gather_object(gathered, meta)
    parts = [p for p in gathered if p is not None]
    shapes, _, manifest, layers, questions_ = parts[0]
    tensors = {
        h: _all_gather_rows(
            None if part is None else part[h], [None if p is None else p[0][h] for p in gathered]
        )
        for h in shapes
    }
    manifest = {
        **manifest,
        "persona_hash": personas.content_hash(),
        "n_prompts": sum(p[1].numel() for p in parts),
        "ranks": n,
        "shards": [p[2]["cache_key"] for p in parts],
    }
    manifest["cache_key"] = cache_key(manifest)
    return ActivationSet(
        tensors,
        personas=personas,
        questions=questions_,
        layers=layers,
        n_tokens=torch.cat([p[1] for p in parts], dim=0),
        manifest=manifest,
    )


def _all_gather_rows(mine: torch.Tensor | None, shapes: list[Any]) -> torch.Tensor:
    """Returns every rank's tensor concatenated along rows, in rank order (on the CPU).

    ``shapes`` holds each rank's ``(shape, dtype)`` (None for a rank with no rows). The tensors
    travel as bytes, padded to the longest rank's, on the current GPU when the group has NCCL.
    """
    import torch.distributed as dist

    present = [s for s in shapes if s is not None]
    tail, dtype = present[0][0][1:], present[0][1]
    rows = [0 if s is None else s[0][0] for s in shapes]
    width = torch.empty((1, *tail), dtype=dtype).view(torch.uint8).numel()
    device = torch.device("cpu")
    if torch.cuda.is_available() and "nccl" in str(dist.get_backend()).lower():
        device = torch.device("cuda", torch.cuda.current_device())
    buffer = torch.zeros((max(rows), width), dtype=torch.uint8, device=device)
    if mine is not None and len(mine):
        as_bytes = mine.contiguous().view(torch.uint8).reshape(len(mine), width)
        buffer[: len(mine)] = as_bytes.to(device)
    out = [torch.empty_like(buffer) for _ in shapes]
    dist.all_gather(out, buffer)
    whole = torch.cat([o[:r] for o, r in zip(out, rows, strict=True)]).cpu()
    return whole.view(dtype).reshape(sum(rows), *tail)
