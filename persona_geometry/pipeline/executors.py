"""Where a study's units run: in this process, across ``torchrun`` ranks, as Ray tasks, or one array shard.

A study's unit stages (extract, data, train, eval) are lists of content-addressed, idempotent
units (``persona_geometry.pipeline.study.Unit``); an executor runs a stage's units and returns
their outputs in the units' order, whatever order they finished in. Each unit records its key
and its outputs in its folder, so a unit already done is never redone, whichever executor
finds it. The executors lean on existing engines for everything else:

==============  ============================================================================
``InProcess``   one after the other, here (the default)
``Torchrun``    rank ``r`` of ``N`` takes units ``r::N``, then all ranks meet at a barrier
``RayTasks``    one Ray core task per unit (``num_gpus=1``, or 0 on CPU); Ray queues them
                on the cluster's GPUs and retries a unit whose worker died (``max_retries``)
``Shard``       array job ``i`` of ``n`` runs units ``i::n`` and nothing after ``eval``
==============  ============================================================================
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from persona_geometry import distributed
from persona_geometry._validation import invalid
from persona_geometry.settings import EXECUTORS

__all__ = ["EXECUTORS", "InProcess", "RayTasks", "Shard", "Torchrun", "make_executor", "parse_shard"]

log = logging.getLogger(__name__)


# run(unit) -> the unit's output files; a module-level function, so Ray can ship it to workers.
UnitFn = Callable[[Any], dict[str, str]]
# run_many(units) -> each unit's output files, in order: units run together where that pays
# (evaluation units sharing one base model load it once); each unit still records its own outputs.
UnitsFn = Callable[[Sequence[Any]], list[dict[str, str]]]


class InProcess:
    """Runs every unit here, in order."""

    name = "inprocess"
    assembles = True  # this process writes the sweep and report

    def map(self, units: Sequence[Any], run: UnitFn, *, together: bool = False, run_many: UnitsFn | None = None) -> list[dict[str, str] | None]:
        """Returns each unit's outputs, in the units' order (through ``run_many`` when given)."""
        return list(run_many(units)) if run_many is not None else [run(u) for u in units]


class Shard:
    """Array job ``index`` of ``count``: runs units ``index::count`` of each unit stage, then stops."""

    name = "shard"
    assembles = False

    def __init__(self, index: int, count: int):
        self.index, self.count = index, count

    def map(self, units: Sequence[Any], run: UnitFn, *, together: bool = False, run_many: UnitsFn | None = None) -> list[dict[str, str] | None]:
        """Returns the outputs of this shard's units, None for the other shards' (or every unit when ``together``).

        With ``run_many`` the shard's units run in one call, all of them locked meanwhile.
        """
        mine = range(len(units)) if together else range(self.index, len(units), self.count)
        out: list[dict[str, str] | None] = [None] * len(units)
        if run_many is not None:
            with ExitStack() as locks:
                for i in mine:  # in the units' order: shards wanting the same units never deadlock
                    locks.enter_context(_unit_lock(units[i]))
                for i, files in zip(mine, run_many([units[i] for i in mine]), strict=True):
                    out[i] = files
            return out
        for i in mine:
            with _unit_lock(units[i]):  # shards running at once compute a shared unit once
                out[i] = run(units[i])
        return out


class Torchrun:
    """Rank ``r`` of a ``torchrun`` launch: runs units ``r::N`` as one process, then waits for the others.

    Inside a unit the rank behaves as a single process (``distributed.local_only``), so
    transformers' ``Trainer`` trains each adapter on its own rank instead of wrapping it in DDP;
    with ``together`` every rank runs every unit, for units that are themselves distributed.
    After the barrier each rank reads the other ranks' outputs from the units' records.
    """

    name = "torchrun"

    def __init__(self) -> None:
        distributed.pin_local_device()
        distributed.init_process_group()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.assembles = self.rank == 0

    def map(self, units: Sequence[Any], run: UnitFn, *, together: bool = False, run_many: UnitsFn | None = None) -> list[dict[str, str] | None]:
        """Returns every unit's outputs, in the units' order, once all ranks have run their share.

        With ``run_many`` a rank runs its share in one call (e.g. its adapters over one base model).
        """
        from persona_geometry.pipeline.study import unit_outputs

        if together:
            for u in units:
                run(u)
        elif run_many is not None:
            with distributed.local_only():
                run_many(units[self.rank :: self.world])
        else:
            for u in units[self.rank :: self.world]:
                with distributed.local_only():
                    run(u)
        distributed.barrier()
        return [unit_outputs(u) for u in units]

    def finish(self) -> None:
        """Holds every rank until rank 0 has written the sweep and report."""
        distributed.barrier()


class RayTasks:
    """Each unit a Ray core task: ``num_gpus=1`` when GPUs are used, else 0; retried on a dead worker.

    Args:
        address: A running cluster's address (``ray://...`` or ``host:port``); without one a
            local Ray instance starts.
        gpus: GPUs to use. A local instance offers this many; units ask for one each when it is
            above 0, none when 0. By default, the GPUs Ray sees.
        max_retries: Ray re-runs a unit whose worker process died this many times.
    """

    name = "ray"
    assembles = True

    def __init__(self, *, address: str | None = None, gpus: int | None = None, max_retries: int = 3, init_kwargs: dict[str, Any] | None = None):
        ray = _import_ray()
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
            invalid("gpus", "RayTasks", "a non-negative int or None", gpus)
        if not ray.is_initialized():
            kwargs = dict(init_kwargs or {})
            if address is None and gpus is not None:
                kwargs.setdefault("num_gpus", gpus)
            ray.init(address=address, **kwargs)
        self.num_gpus = 1 if (gpus if gpus is not None else int(ray.available_resources().get("GPU", 0))) > 0 else 0
        self.max_retries = max_retries
        log.info("Ray: %s, %d GPU(s) per unit", ray.cluster_resources(), self.num_gpus)

    def map(self, units: Sequence[Any], run: UnitFn, *, together: bool = False, run_many: UnitsFn | None = None) -> list[dict[str, str] | None]:
        """Returns every unit's outputs, in the units' order, once Ray has run them all (one task per unit).

        ``run_many`` is not used: each unit is its own task, so Ray can queue and retry it alone.
        """
        ray = _import_ray()
        task = ray.remote(_call).options(num_gpus=self.num_gpus, max_retries=self.max_retries)
        refs = [task.remote(run, u) for u in units]
        return list(ray.get(refs))


def _call(run: UnitFn, unit: Any) -> dict[str, str]:
    return run(unit)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError("The Ray executor needs Ray: install the 'ray' extra (pip install 'persona-geometry[ray]').") from e
    return ray


@contextmanager
def _unit_lock(unit: Any) -> Any:
    """Holds an exclusive file lock next to the unit's folder while it runs."""
    lock = Path(str(unit.folder) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parse_shard(value: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """Returns ``(index, count)`` from ``"I/N"`` (0 ≤ I < N), or None.

    Raises:
        ValueError: If the value is not of that form.
    """
    if value is None or isinstance(value, tuple):
        return value
    try:
        index, count = (int(x) for x in str(value).split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        invalid("shard", "run_study", "'I/N' with 0 <= I < N, e.g. '0/4'", value)
    return index, count


def make_executor(
    executor: str = "auto",
    *,
    shard: str | tuple[int, int] | None = None,
    ray_address: str | None = None,
    gpus: int | None = None,
) -> InProcess | Shard | Torchrun | RayTasks:
    """Returns the executor a run asks for; ``"auto"`` is torchrun under a launcher, else in process.

    Raises:
        ValueError: On an unknown executor, a bad shard, or a shard with another executor.
        ImportError: For ``"ray"`` without Ray installed (names the extra).
    """
    if executor not in EXECUTORS:
        invalid("executor", "run_study", f"one of {list(EXECUTORS)}", executor)
    parsed = parse_shard(shard)
    if parsed is not None:
        if executor not in ("auto", "inprocess"):
            invalid("executor", "run_study", "'auto' or 'inprocess' with a shard", executor)
        return Shard(*parsed)
    if executor == "ray":
        return RayTasks(address=ray_address, gpus=gpus)
    if executor == "torchrun" or (executor == "auto" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1):
        return Torchrun()
    return InProcess()
