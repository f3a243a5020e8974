"""Ranks and world size of a ``torchrun`` launch, and the pieces of extraction across its ranks.

``torchrun --nproc-per-node N`` starts N copies of a program with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set. This module reads them, starts the process group (gloo, plus NCCL for CUDA
tensors where there is a GPU), pins each rank to its own GPU, and gives an extraction what it
needs to run across the ranks (``extract_activations`` does the rest): every rank plans the
units of work one process would run (its packs, or its padded batches), ``balanced_shares``
gives each rank a set of those units with near-equal tokens, and ``gather_rows``
puts every rank's rows at their prompt positions on every rank, as raw bytes. Each unit is the
same forward as in one process, so the gathered set is the one-process set (float32 on CPU:
byte for byte).

``local_only()`` makes a rank behave as a single process for a while: ``world_size()`` reads
1, and the launcher's variables are hidden from libraries that read them (transformers'
``Trainer`` would otherwise wrap an independent adapter's model in DDP).
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import heapq
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from persona_geometry._validation import check_positive_int, invalid

__all__ = [
    "balanced_shares",
    "barrier",
    "block_of",
    "gather_objects",
    "gather_rows",
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


def balanced_shares(costs: Sequence[int], n_shares: int) -> list[list[int]]:
    """Returns ``n_shares`` shares of ``range(len(costs))`` with near-equal summed costs.

    Longest processing time first: positions in decreasing cost (the earlier on a tie), each
    to the share with the least cost so far (the lower share on a tie). Every position is in
    exactly one share and each share is in increasing order; a share's cost is within the
    largest single cost of ``sum(costs) / n_shares`` and at most 4/3 of the best possible
    split's. Shares need not be contiguous: a unit's rows land at their prompt positions
    whoever computes them, and contiguous runs of a few large packs split unevenly (2,400 long
    prompts on two H200s: 93k against 100k tokens). Shares may be empty (more shares than
    positions). The same costs always give the same shares.

    Raises:
        ValueError: If ``n_shares`` is not a positive int or a cost is negative.
    """
    n_shares = check_positive_int(n_shares, "n_shares", "balanced_shares")
    if any(c < 0 for c in costs):
        invalid("costs", "balanced_shares", "non-negative numbers", min(costs))
    loads = [(0, k) for k in range(n_shares)]  # a heap of (cost so far, share)
    shares: list[list[int]] = [[] for _ in range(n_shares)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, k = heapq.heappop(loads)
        shares[k].append(i)
        heapq.heappush(loads, (load + costs[i], k))
    return [sorted(share) for share in shares]


def gather_objects(obj: Any) -> list[Any]:
    """Returns every rank's ``obj`` (picklable), in rank order, on every rank."""
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(
    mine: Mapping[str, Tensor] | None, positions: Sequence[Sequence[int]], n_rows: int
) -> dict[str, Tensor]:
    """Returns every rank's rows put at their positions, on every rank (on the CPU).

    Rank ``r`` passes ``mine[name]`` with one row per entry of ``positions[r]`` (None when it
    has none); row ``k`` of rank ``r`` lands at ``out[name][positions[r][k]]``. Every rank passes
    the same ``positions``, which together name each of the ``n_rows`` rows once. Rows are
    copied as raw bytes, never converted: the result holds exactly what each rank computed.
    Labels and shapes travel as objects; the tensors through the tensor backend (NCCL between
    GPUs: pickling ~70 MB of activations through gloo took ~0.8 s on 2 H200s).

    Raises:
        ValueError: If ``mine`` does not hold one row per position of this rank.
    """
    r = rank()
    if mine is not None:
        for name, t in mine.items():
            if len(t) != len(positions[r]):
                invalid(
                    "mine",
                    "gather_rows",
                    f"one row per position of rank {r} ({len(positions[r])})",
                    f"{len(t)} rows of {name!r}",
                )
    meta = None if mine is None else {k: (tuple(t.shape[1:]), t.dtype) for k, t in mine.items()}
    metas = gather_objects(meta)
    present = next(m for m in metas if m is not None)
    where = torch.as_tensor([p for share in positions for p in share], dtype=torch.long)
    out = {}
    for name, (tail, dtype) in present.items():
        shapes = [
            None if m is None else ((len(positions[i]), *tail), dtype) for i, m in enumerate(metas)
        ]
        out[name] = _all_gather_rows(None if mine is None else mine[name], shapes, where, n_rows)
    return out


def _all_gather_rows(
    mine: torch.Tensor | None, shapes: list[Any], where: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """Returns every rank's rows placed at ``where`` (every rank's positions, in rank order),
    on the CPU.

    ``shapes`` holds each rank's ``(shape, dtype)`` (None for a rank with no rows). The tensors
    travel as bytes, padded to the longest rank's, on the current GPU when the group has NCCL;
    there the rows are also put in place, and the whole set crosses to the host once, into
    page-locked memory (a host-side scatter of the gathered rows cost ~0.1 s on 2,400 prompts).
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
    placed = torch.empty((n_rows, width), dtype=torch.uint8, device=device)
    placed[where.to(device)] = torch.cat([o[:r] for o, r in zip(out, rows, strict=True)])
    if device.type == "cuda":
        host = torch.empty(placed.shape, dtype=torch.uint8, pin_memory=True)
        placed = host.copy_(placed)
    return placed.view(dtype).reshape(n_rows, *tail)
