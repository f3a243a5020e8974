"""``run_study``: from a ``StudyConfig`` to a report, one cached, resumable stage at a time.

Stages, in order, each writing under the study's output folder:

========  ==========================================================================
extract   last-token activations of every persona × probe question (``activations/``)
data      base-model answers to the training questions, and one marker dataset per source
train     one marker LoRA adapter per source and seed (``train/<source>/seed<k>/``)
eval      marker rates of every persona under each adapter (``eval/<source>/seed<k>/``)
sweep     per-layer correlation of centered cosine with the source rate (``sweep/``)
report    robustness at one layer, Markdown and JSON report, figures (``report/``)
========  ==========================================================================

A stage is skipped when a ``.stage.json`` in its folder records the same input key (a stable
hash of everything it depends on, earlier stages' keys included), so editing the eval settings
re-runs eval, sweep and report but neither extraction nor training. Within ``train`` and
``eval`` each source and seed is its own unit with its own marker, so an interrupted run
resumes at the unit it stopped in (training itself resumes from its last checkpoint).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_geometry._io import atomic_write_json, atomic_write_text
from persona_geometry._validation import check_one_of, invalid
from persona_geometry.distributed import block_of
from persona_geometry.personas import PersonaSet, builtin_personas
from persona_geometry.pipeline.config import StudyConfig
from persona_geometry.provenance import package_versions, stable_hash
from persona_geometry.questions import builtin_questions, load_questions, training_questions
from persona_geometry.resume import KeyedFolder
from persona_geometry.settings import STAGES

__all__ = ["STAGES", "UNIT_STAGES", "StudyResult", "Unit", "run_study", "run_unit", "run_units", "study_inputs", "study_units", "unit_outputs"]

log = logging.getLogger(__name__)

_MARKER_FILE = ".stage.json"


@dataclass(frozen=True, kw_only=True)
class StudyResult:
    """What a study run produced: the output folder, which stages ran or were skipped, the files."""

    out: Path
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    computed: tuple[str, ...] = ()  # units computed by this run, wherever they ran (the others were cached)

    def summary(self) -> str:
        """Returns a few lines a person reads."""
        lines = [f"Study output: {self.out}"]
        timed = ", ".join(f"{s} {self.seconds[s]:.0f}s" for s in self.ran if s in self.seconds)
        lines.append(f"  ran: {timed or 'nothing'}; cached: {', '.join(self.skipped) or 'nothing'}")
        lines.append(f"  units computed: {len(self.computed)}")
        for name, path in self.files.items():
            lines.append(f"  {name}: {path}")
        return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class _Inputs:
    personas: PersonaSet
    questions: tuple[str, ...]
    training_questions: tuple[str, ...]
    centering: PersonaSet | None
    sources: tuple[str, ...]


def study_inputs(config: StudyConfig) -> _Inputs:
    """Returns the personas, questions, centering set and sources a config names, checked.

    Raises:
        ValueError: If a file is missing, or the reference, a source, a held-out persona, a
            bystander exclusion or a centering name is not among the personas.
    """
    personas = builtin_personas() if config.personas == "builtin" else PersonaSet.load(config.personas)
    questions = builtin_questions() if config.questions == "builtin" else load_questions(config.questions)
    train_q = training_questions() if config.training_questions == "builtin" else load_questions(config.training_questions)
    names = personas.names

    def _known(values: Sequence[str], key: str) -> None:
        for v in values:
            if v not in names:
                raise ValueError(f"The study config's '{key}' names {v!r}, which is not one of the personas {names}.")

    _known([config.geometry.reference], "geometry.reference")
    sources = tuple(names) if config.marker.sources == "all" else tuple(config.marker.sources)
    if not sources:
        raise ValueError("The study config's 'marker.sources' must be 'all' or a non-empty list of persona names. Got [] instead.")
    _known(sources, "marker.sources")
    _known(config.analysis.holdout, "analysis.holdout")
    _known(config.data.exclude, "data.exclude")
    centering = None
    if isinstance(config.geometry.centering, str):
        centering = PersonaSet.load(config.geometry.centering)
    elif config.geometry.centering is not None:
        _known(config.geometry.centering, "geometry.centering")
    config.model.template_text()  # a missing template file fails here, before any model loads
    layers = config.extract.layers
    n_layers = _n_layers(config.model.name, config.model.revision)
    if n_layers is not None:  # read from config.json: a bad layer fails now, not after training
        for key in ("extract.layers", "analysis.primary_layer", "analysis.layer"):
            section, field = key.split(".")
            values = getattr(getattr(config, section), field)
            for value in [values] if isinstance(values, int) else list(values or []):
                if not -n_layers <= value < n_layers:
                    raise ValueError(f"The study config's '{key}' must be block indices in [{-n_layers}, {n_layers - 1}] ({config.model.name} has {n_layers} blocks). Got {value} instead.")
    for key in ("primary_layer", "layer"):
        value = getattr(config.analysis, key)
        if value is not None and layers is not None and value not in layers:
            raise ValueError(f"The study config's 'analysis.{key}' is {value}, which is not among extract.layers {list(layers)}.")
    return _Inputs(
        personas=personas,
        questions=tuple(questions),
        training_questions=tuple(train_q),
        centering=centering,
        sources=sources,
    )


def _n_layers(name: str, revision: str | None) -> int | None:
    """Returns the model's number of blocks from its config.json (local folder or hub cache), or None."""
    import json

    path = Path(name).expanduser()
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - not a hub id the library accepts: nothing to read
            cached = None
        config_file = Path(cached) if isinstance(cached, str) else None
    try:
        cfg = json.loads(config_file.read_text()) if config_file is not None else {}
    except (OSError, ValueError):
        return None
    n = cfg.get("num_hidden_layers", (cfg.get("text_config") or {}).get("num_hidden_layers"))
    return n if isinstance(n, int) and n > 0 else None


def _stage_record(folder: Path, key: str) -> KeyedFolder:
    """Returns the ``.stage.json`` record of the input key a stage (or one unit of it) started and finished with.

    An interrupted unit with the same key keeps its folder, so training resumes from its last
    checkpoint; one made with other settings is removed rather than mixed in.
    """
    return KeyedFolder(folder, key, record=_MARKER_FILE)


class _UnitRecord(KeyedFolder):
    """A unit's ``.stage.json`` record, which may be its stage's record of the same work.

    The data stage's one unit writes into the stage's own folder, so the stage's record, written
    when the stage finishes, replaces the unit's. The stage names the unit's key in it
    (``unit_key``): a unit reads such a record as its own finished one, not as a stale record to
    clear, or a second process reaching the unit after the first finished the stage would delete
    the data the first is training from. Any other key is still stale.
    """

    def info(self) -> dict[str, Any]:
        """Returns the stored record, a stage's record of this unit's work carrying the unit's key."""
        record = super().info()
        if record.get("key") != self.key and record.get("unit_key") == self.key:
            return {**record, "key": self.key}
        return record


def _unit_record(unit: Unit) -> KeyedFolder:
    """Returns a unit's record: its key, attempts, where it ran and its output files (``_UnitRecord``)."""
    return _UnitRecord(Path(unit.folder), unit.key, record=_MARKER_FILE)


def run_study(
    config: StudyConfig,
    *,
    stages: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    executor: str | Any = "auto",
    shard: str | tuple[int, int] | None = None,
    ray_address: str | None = None,
    gpus: int | None = None,
) -> StudyResult:
    """Returns the result of running the study's stages, skipping those whose inputs are unchanged.

    The unit stages (extract, data, train, eval) run their units on the chosen executor
    (``persona_geometry.pipeline.executors``); the sweep and report run in the process that
    assembles (rank 0 under torchrun). Every executor gives the same files: units are fixed by
    the study, cached by key and merged in their fixed order.

    Args:
        config: The validated study config.
        stages: A subset of ``STAGES`` to run (in pipeline order); all when None. A stage whose
            inputs come from an earlier stage needs that stage's outputs on disk.
        force: Re-run the chosen stages even when their outputs are current.
        progress: Show progress bars.
        executor: ``"auto"`` (torchrun under a launcher, else in process), ``"inprocess"``,
            ``"torchrun"``, ``"ray"``, or an executor object.
        shard: ``"I/N"``: run only array shard ``I`` of ``N`` of the unit stages, then stop;
            a plain run afterwards finds those units cached and finishes.
        ray_address: The Ray cluster to use (``executor="ray"``); a local instance without one.
        gpus: GPUs for the Ray executor (see ``RayTasks``).

    Raises:
        ValueError: On an unknown stage or executor, a bad shard, or inputs the config names
            that don't exist.
        ImportError: For ``executor="ray"`` without Ray installed.
    """
    from functools import partial

    from persona_geometry.pipeline.executors import make_executor

    chosen = list(STAGES) if stages is None else list(stages)
    for s in chosen:
        if s not in STAGES:
            invalid("stages", "run_study", f"stage names from {list(STAGES)}", s)
    # Every check that needs no weights, before anything is trained or the output folder exists.
    if "train" in chosen:
        _check_train_placement(config)
    from persona_geometry.pipeline.plan import plan_study

    plan_study(config, stages=chosen)
    if {"sweep", "report"} & set(chosen) and "extract" not in chosen and not (Path(config.out) / "extract" / _MARKER_FILE).is_file():
        raise ValueError(f"No activations under {config.out}: run the 'extract' stage first.")  # before anything is written
    inputs = study_inputs(config)
    # Absolute, so workers started elsewhere (Ray) write to the same place.
    config = config.with_overrides(out=str(Path(config.out).resolve()))
    ex = make_executor(executor, shard=shard, ray_address=ray_address, gpus=gpus) if isinstance(executor, str) else executor
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if ex.assembles:
        _write_resolved_config(config, out)
    keys = _stage_keys(config, inputs)
    ran, skipped, files, seconds = [], [], {}, {}
    computed: list[str] = []
    runners = {"sweep": _sweep, "report": _report}
    if any(s in chosen for s in ("sweep", "report")) and "extract" not in chosen and not _extract_intact(out):
        chosen.append("extract")  # the activations the sweep reads fail verification: recompute them
    for stage in STAGES:
        if stage not in chosen:
            continue
        if stage not in UNIT_STAGES and not ex.assembles:
            continue  # an array shard stops after its units; torchrun's rank 0 assembles
        keys[stage] = _stage_key(out, stage, keys[stage])
        marker = _stage_record(out / stage, keys[stage])
        if marker.done() and not force and (stage != "extract" or _extract_intact(out)):
            log.info("stage %s: inputs unchanged, skipped", stage)
            skipped.append(stage)
            continue
        log.info("stage %s: running (%s)", stage, ex.name)
        start = time.perf_counter()
        shared: dict[str, str] = {}  # the key of the unit whose folder is the stage's (data): see _UnitRecord
        if stage in UNIT_STAGES:
            units = study_units(config, stage, inputs=inputs)
            shared = next(({"unit_key": u.key} for u in units if Path(u.folder) == out / stage), {})
            before = {u.name: _unit_record(u).done() and not force for u in units}
            # train.data_parallel under torchrun: every rank trains each adapter together (DDP).
            collective = stage == "train" and config.train.data_parallel and ex.name == "torchrun"
            run = partial(run_unit, config, force=force, progress=progress and len(units) == 1, collective=collective)
            # Evaluation units share one base model: each process runs its share in one pass.
            run_many = partial(run_units, config, force=force, progress=progress) if stage == "eval" else None
            # Every array shard needs the (single) data unit; the shards compute it once, under a lock.
            together = (stage == "data" and ex.name == "shard") or collective
            results = ex.map(units, run, together=together, run_many=run_many)
            produced = {}
            for u, r in zip(units, results, strict=True):
                if r is not None:
                    produced.update(r)
                    if not before[u.name]:
                        computed.append(u.name)
        else:
            produced = runners[stage](config, inputs, out, keys, progress=progress, force=force)
        seconds[stage] = time.perf_counter() - start
        log.info("stage %s: done in %.1f s", stage, seconds[stage])
        if ex.assembles:
            marker.finish(stage=stage, files=produced, outputs=_outputs_token(produced), seconds=round(seconds[stage], 2), **shared)
        files.update(produced)
        ran.append(stage)
    if hasattr(ex, "finish"):
        ex.finish()
    if "report" in chosen and ex.assembles:
        files.setdefault("report", str(out / "report" / "report.md"))
    return StudyResult(out=out, ran=tuple(ran), skipped=tuple(skipped), files=files, seconds=seconds, computed=tuple(computed))


def _check_train_placement(config: StudyConfig) -> None:
    """Raises ValueError if the train stage cannot run with the study's ``model.device_map``."""
    from persona_geometry.training.lora import check_train_device_map

    m = config.model
    if m.device_map is None:
        return
    try:
        check_train_device_map(m.device_map, "model.device_map", "run_study")
    except ValueError:
        raise ValueError(
            f"The study config's 'model.device_map' offloads blocks to 'cpu' or 'disk' ({m.device_map}), where the train stage cannot "
            "run: map every block to a GPU, or run the train stage without model.device_map and model.max_memory."
        ) from None
    if config.train.data_parallel:
        raise ValueError("The study config's 'train.data_parallel' needs one whole model per rank: it cannot be true with 'model.device_map' set.")


def _write_resolved_config(config: StudyConfig, out: Path) -> None:
    import yaml

    atomic_write_text(out / "config.resolved.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


# The stages whose outputs each stage reads: its key covers their recorded outputs, so a stage
# re-run (forced, or with new inputs) re-runs everything that read it.
_READS: dict[str, tuple[str, ...]] = {
    "extract": (),
    "data": (),
    "train": ("data",),
    "eval": ("train",),
    "sweep": ("extract", "eval"),
    "report": ("extract", "eval", "sweep"),
}


def _stage_key(out: Path, stage: str, settings_key: str) -> str:
    """Returns a stage's key: its settings' key and the outputs recorded by the stages it reads."""
    upstream = {}
    for up in _READS[stage]:
        record = _stage_record(out / up, "-").info()
        upstream[up] = [record.get("key"), record.get("outputs")]
    return stable_hash([settings_key, upstream])


def _outputs_token(files: dict[str, str]) -> str:
    """Returns a hash of the produced files' names, sizes and modification times (cheap, no reading).

    A rewritten output changes it, so whatever read the old one runs again; a reused one (an
    extraction cache hit) keeps it.
    """
    entries = []
    for name, path in sorted(files.items()):
        p = Path(path)
        found = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.name != _MARKER_FILE)
        entries.append([name, [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in found]])
    return stable_hash(entries)


def _extract_intact(out: Path) -> bool:
    """Whether every activation set the extract stage recorded loads and passes its checksums."""
    import json

    marker = out / "extract" / _MARKER_FILE
    try:
        files = json.loads(marker.read_text()).get("files", {})
    except (OSError, ValueError):
        return True  # never run: nothing to verify (the sweep says to run extract first)
    for name in files:
        try:
            _extracted(out, name)
        except (ValueError, OSError) as e:
            log.info("stage extract: its recorded %s fail verification (%s); recomputing", name, e)
            return False
    return True


def _stage_keys(config: StudyConfig, inputs: _Inputs) -> dict[str, str]:
    from persona_geometry.models import model_identity

    c = config.to_dict()
    # The template's text, not its file name: editing the file re-runs what depends on it. The
    # model's identity (weights, tokenizer files, resolved hub commit), not only its name.
    model = {
        **c["model"],
        "chat_template": stable_hash(config.model.template_text()),
        "identity": model_identity(config.model.name, config.model.revision),
    }
    extract = stable_hash([model, inputs.personas.content_hash(), inputs.questions, c["extract"],
                           inputs.centering.content_hash() if inputs.centering else None])  # fmt: skip
    data = stable_hash([model, inputs.personas.content_hash(), inputs.training_questions, c["responses"], c["data"],
                        c["eval"]["backend"], inputs.sources])  # fmt: skip
    train = stable_hash([data, c["train"], c["marker"]])
    evaluation = stable_hash([train, inputs.questions, c["eval"], c["data"]["marker"]])
    sweep = stable_hash([extract, evaluation, c["geometry"], c["analysis"]])
    report = stable_hash([sweep, c["figures"], "report-v2"])
    return {"extract": extract, "data": data, "train": train, "eval": evaluation, "sweep": sweep, "report": report}


# --- stages -----------------------------------------------------------------------------------

# --- units ------------------------------------------------------------------------------------
# Prompts per extraction unit: whole personas, about this many prompts (one cache chunk).
_UNIT_PROMPTS = 1024
UNIT_STAGES: tuple[str, ...] = ("extract", "data", "train", "eval")


@dataclass(frozen=True)
class Unit:
    """One content-addressed, idempotent piece of a unit stage, run by any executor.

    ``folder`` holds its record (``.stage.json``: key, attempts, where it ran, its output files)
    and its log (``unit.log``); ``args`` say which piece (a persona block, a source and seed).
    """

    stage: str
    name: str
    key: str
    folder: str
    args: tuple[Any, ...] = ()


def study_units(config: StudyConfig, stage: str, *, inputs: _Inputs | None = None) -> list[Unit]:
    """Returns a unit stage's units in their fixed order (the order their outputs merge in).

    Extraction is cut into blocks of whole personas of about 1,024 prompts, fixed by the study
    (not by the executor), so every executor computes the same blocks; data is one unit; train
    and eval have one unit per source and seed.
    """
    check_one_of(stage, "stage", "study_units", UNIT_STAGES)
    inputs = inputs or study_inputs(config)
    out = Path(config.out)
    key = _stage_keys(config, inputs)[stage]
    if stage == "extract":
        units = []
        sets = [("activations", inputs.personas)] + ([("centering_activations", inputs.centering)] if inputs.centering else [])
        for name, personas in sets:
            n = max(1, min(len(personas), math.ceil(len(personas) * len(inputs.questions) / _UNIT_PROMPTS)))
            for i in range(n):
                block = block_of(len(personas), n, i)
                label = name if n == 1 else f"{name}:{i}"
                args = (name, label, block.start, block.stop)
                units.append(Unit(stage, f"extract/{label}", stable_hash([key, args]), str(out / "extract" / name / str(i)), args))
        return units
    if stage == "data":
        return [Unit(stage, "data", key, str(out / "data"))]
    return [
        Unit(stage, f"{stage}/{source}/seed{seed}", stable_hash([key, source, seed]), str(out / stage / source / f"seed{seed}"), (source, seed))
        for source, seed in _units(config, inputs)
    ]


def unit_outputs(unit: Unit) -> dict[str, str]:
    """Returns the output files a finished unit recorded.

    Raises:
        ValueError: If the unit has not finished with its current key.
    """
    record = _unit_record(unit)
    if not record.done():
        raise ValueError(f"Unit {unit.name} has not finished (no current record in {unit.folder}).")
    return dict(record.info().get("files", {}))


def run_unit(config: StudyConfig, unit: Unit, *, force: bool = False, progress: bool = False, collective: bool = False) -> dict[str, str]:
    """Returns a unit's output files, running it unless its folder records it finished with its key.

    The unit logs where it runs (host, process, device) and writes its log next to its output;
    its record counts the attempts at its key (a unit retried after its worker died shows 2).
    With ``collective`` every rank of a torchrun launch calls this for the same unit at once
    and computes it together (one adapter trained with DDP); rank 0 keeps the record.
    Otherwise one process at a time works on a unit (a file lock); another waits, then reuses
    its result.
    """
    if collective:
        return _run_collective(config, unit, force=force, progress=progress)
    with _unit_lock(config, unit):  # "cached? run, record" as one step: two runs never both train an adapter
        return _run_unit_locked(config, unit, force=force, progress=progress)


_HELD_LOCKS: set[str] = set()


@contextmanager
def _unit_lock(config: StudyConfig, unit: Unit) -> Iterator[None]:
    """Holds the unit's file lock, ``<out>/.locks/<unit folder>.lock``, waiting while another process has it.

    Re-entrant within a process (``run_units`` locks a group, then runs each unit). A unit that
    every torchrun rank runs together takes no lock: its ranks must enter it at once.
    """
    from filelock import FileLock, Timeout

    out = Path(config.out)
    rel = Path(unit.folder).relative_to(out)
    path = out / ".locks" / rel.parent / f"{rel.name}.lock"
    if str(path) in _HELD_LOCKS:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("unit %s: another process is running it; waiting to reuse its result", unit.name)
        lock.acquire()
    _HELD_LOCKS.add(str(path))
    try:
        yield
    finally:
        _HELD_LOCKS.discard(str(path))
        lock.release()


def _run_unit_locked(config: StudyConfig, unit: Unit, *, force: bool, progress: bool) -> dict[str, str]:
    folder = Path(unit.folder)
    record = _unit_record(unit)
    if record.done() and not force:
        log.info("unit %s: cached", unit.name)
        return dict(record.info().get("files", {}))
    where = _begin(unit, record, force=force)
    with _unit_log(folder / "unit.log"):
        log.info("unit %s: running on %s (pid %d, CUDA_VISIBLE_DEVICES=%s, attempt %d)", unit.name, where["host"], where["pid"], where["cuda_visible_devices"], where["attempt"])
        start = time.perf_counter()
        inputs = study_inputs(config)
        with _quiet_loading():
            files = _UNIT_RUNNERS[unit.stage](config, inputs, Path(config.out), unit, progress=progress)
        seconds = time.perf_counter() - start
        log.info("unit %s: done in %.1f s", unit.name, seconds)
    record.finish(**where, files=files, seconds=round(seconds, 2))
    return files


def _run_collective(config: StudyConfig, unit: Unit, *, force: bool, progress: bool) -> dict[str, str]:
    """Runs one unit on every rank together; rank 0 begins and finishes its record, between barriers."""
    from persona_geometry import distributed

    folder = Path(unit.folder)
    record = _unit_record(unit)
    cached = record.done() and not force  # every rank reads the record before rank 0 touches it
    distributed.barrier()
    if cached:
        log.info("unit %s: cached", unit.name)
        return dict(record.info().get("files", {}))
    main = distributed.rank() == 0
    where = _begin(unit, record, force=force) if main else {}
    distributed.barrier()  # the folder is ready before any rank writes into it
    with _unit_log(folder / "unit.log") if main else nullcontext():
        log.info("unit %s: running on %d ranks together (rank %d, pid %d)", unit.name, distributed.world_size(), distributed.rank(), os.getpid())
        start = time.perf_counter()
        inputs = study_inputs(config)
        with _quiet_loading():
            files = _UNIT_RUNNERS[unit.stage](config, inputs, Path(config.out), unit, progress=progress)
        seconds = time.perf_counter() - start
    if main:
        record.finish(**where, ranks=distributed.world_size(), files=files, seconds=round(seconds, 2))
    distributed.barrier()
    return files


def _begin(unit: Unit, record: KeyedFolder, *, force: bool) -> dict[str, Any]:
    """Starts a unit's record (counting attempts at its key) and returns where it runs."""
    import socket

    previous = record.info()
    attempt = previous.get("attempt", 1) + 1 if record.state() == "unfinished" and not force else 1
    where = {"unit": unit.name, "attempt": attempt, "host": socket.gethostname(), "pid": os.getpid(),
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}  # fmt: skip
    record.begin(force=force, **where)
    return where


def run_units(config: StudyConfig, units: Sequence[Unit], *, force: bool = False, progress: bool = False) -> list[dict[str, str]]:
    """Returns each unit's output files, in the units' order, running those not finished.

    Evaluation units on the HF back end run together: the base model is loaded once, every
    pending adapter is attached unmerged and their rows share batches
    (``source_rates_by_adapter``). Each unit still gets its own folder, record, log and files,
    the same as :func:`run_unit` writes for it alone (completions are seeded per completion,
    so grouping changes no completion). Other units run one after the other.
    """
    from contextlib import ExitStack

    units = list(units)
    with ExitStack() as locks:
        for u in units:  # in the units' order, so two processes locking overlapping groups never deadlock
            locks.enter_context(_unit_lock(config, u))
        pending = [u for u in units if force or not _unit_record(u).done()]
        if len(pending) > 1 and all(u.stage == "eval" for u in pending) and config.eval.backend == "hf":
            _eval_units_together(config, pending, force=force, progress=progress)
            force = False  # just computed: read back below
        return [run_unit(config, u, force=force, progress=progress and len(units) == 1) for u in units]


def _eval_units_together(config: StudyConfig, units: list[Unit], *, force: bool, progress: bool) -> None:
    """Runs several eval units in one pass over one base model, each writing its own folder and record."""
    from contextlib import ExitStack

    from persona_geometry.eval import source_rates_by_adapter

    inputs = study_inputs(config)
    out = Path(config.out)
    e = config.eval
    records = {u.name: _unit_record(u) for u in units}
    where = {u.name: _begin(u, records[u.name], force=force) for u in units}
    with ExitStack() as logs:
        for u in units:
            logs.enter_context(_unit_log(Path(u.folder) / "unit.log"))
        first = where[units[0].name]
        log.info("units %s: running together on %s (pid %d, CUDA_VISIBLE_DEVICES=%s), one base model",
                 ", ".join(u.name for u in units), first["host"], first["pid"], first["cuda_visible_devices"])  # fmt: skip
        start = time.perf_counter()
        with _quiet_loading():
            source_rates_by_adapter(
                config.model.name,
                {u.name: out / "train" / u.args[0] / f"seed{u.args[1]}" / "adapter" for u in units},
                inputs.personas,
                list(inputs.questions),
                sources={u.name: u.args[0] for u in units},
                out_dirs={u.name: Path(u.folder) for u in units},
                seeds={u.name: e.seed + u.args[1] for u in units},
                **_eval_kwargs(config),
                progress=progress,
            )
        seconds = time.perf_counter() - start
        log.info("units %s: done in %.1f s", ", ".join(u.name for u in units), seconds)
    for u in units:
        source, seed = u.args
        files = {f"eval:{source}:seed{seed}": str(Path(u.folder) / "run_result.json")}
        records[u.name].finish(**where[u.name], files=files, seconds=round(seconds / len(units), 2), together=len(units))


@contextmanager
def _unit_log(path: Path) -> Iterator[None]:
    """Copies the package's log records to ``path`` while the unit runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("persona_geometry")
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


_LOADED: dict[str, Any] = {}


def _model(config: StudyConfig) -> Any:
    """Returns the study's base model, loaded once per process (extraction units share it)."""
    from persona_geometry.models import load_model, model_identity

    m = config.model
    # The weights' identity, not only the name: weights rebuilt in place in this process load anew.
    key = stable_hash([m.name, m.device, m.dtype, m.revision, m.device_map, m.max_memory, m.offload_folder, model_identity(m.name, m.revision)])
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_model(m.name, dtype=m.dtype, revision=m.revision, **m.placement())
    return _LOADED[key]


def _extract_unit(config: StudyConfig, inputs: _Inputs, out: Path, unit: Unit, **kw: Any) -> dict[str, str]:
    from persona_geometry.extract import extract_activations
    from persona_geometry.personas import PersonaSet

    name, label, start, stop = unit.args
    personas = inputs.personas if name == "activations" else inputs.centering
    common: dict[str, Any] = dict(
        hooks=config.extract.hooks,
        layers=list(config.extract.layers) if config.extract.layers is not None else None,
        engine=config.extract.engine,
        chat_template=_chat_template(config),
        cache_dir=out / "cache",
        progress=kw["progress"],
    )
    if config.extract.batch_tokens is not None:
        common["batch_tokens"] = config.extract.batch_tokens
    if config.extract.compile_blocks is not None:
        common["compile_blocks"] = config.extract.compile_blocks
    # The extraction cache already holds each block, saved atomically: the unit records where.
    acts = extract_activations(_model(config), PersonaSet(personas[i] for i in range(start, stop)), inputs.questions, **common)
    return {label: str(out / "cache" / acts.manifest["cache_key"])}


def _verified(path: str) -> Any:
    """Returns the activation set at ``path``, its checksums verified and its cache key checked."""
    from persona_geometry.activations import ActivationSet
    from persona_geometry.store import cache_key

    acts = ActivationSet.load(path)  # verifies the tensor and label checksums
    folder = Path(path).name
    # An extraction's set lives under its key; one saved by hand (no key recorded) is taken as is.
    key = acts.manifest.get("cache_key")
    if key is not None and (key != folder or cache_key(acts.manifest) != folder):
        raise ValueError(f"The activations in {path} do not carry their folder's cache key: run 'extract' again.")
    return acts


def _extracted(out: Path, name: str) -> Any:
    """Returns the ActivationSet the extract stage recorded under ``name``, its persona blocks joined in order."""
    import json

    from persona_geometry.extend import concat_personas

    marker = out / "extract" / _MARKER_FILE
    files = json.loads(marker.read_text()).get("files", {}) if marker.is_file() else {}
    paths = [files[name]] if name in files else [v for k, v in files.items() if k.startswith(name + ":")]
    if not paths:
        raise ValueError(f"No {name.replace('_', ' ')} under {out}: run the 'extract' stage first.")
    acts = _verified(paths[0])
    for path in paths[1:]:
        acts = concat_personas(acts, _verified(path))
    return acts


def _chat_template(config: StudyConfig) -> str | None:
    return config.model.template_text()


def _data_unit(config: StudyConfig, inputs: _Inputs, out: Path, unit: Unit, **kw: Any) -> dict[str, str]:
    from persona_geometry.training import build_marker_dataset, generate_responses

    responses = out / "data" / "responses.jsonl"
    r = config.responses
    generate_responses(
        config.model.name,
        inputs.personas,
        list(inputs.training_questions),
        out_path=responses,
        temperature=r.temperature,
        top_p=r.top_p,
        max_new_tokens=r.max_new_tokens,
        seed=r.seed,
        backend=r.backend or config.eval.backend,
        vllm_kwargs=_tensor_parallel(r.tensor_parallel_size),
        device=config.model.device,
        dtype=config.model.dtype,
        chat_template=_chat_template(config),
        progress=kw["progress"],
    )
    files = {"responses": str(responses)}
    for source in inputs.sources:
        path = out / "data" / f"{source}.jsonl"
        build_marker_dataset(responses, inputs.personas, config.data.for_source(source), out_path=path)
        files[f"data:{source}"] = str(path)
    return files


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hides transformers' per-load progress bars while the stage shows one bar over its units."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _units(config: StudyConfig, inputs: _Inputs) -> list[tuple[str, int]]:
    return [(source, seed) for source in inputs.sources for seed in config.marker.seeds]


def _train_unit(config: StudyConfig, inputs: _Inputs, out: Path, unit: Unit, **kw: Any) -> dict[str, str]:
    import dataclasses

    from persona_geometry.training import train_marker

    source, seed = unit.args
    folder = Path(unit.folder)
    train_marker(
        config.model.name,
        out / "data" / f"{source}.jsonl",
        folder,
        dataclasses.replace(config.train, seed=seed, dtype=config.train_dtype()),
        source=source,
        marker=config.data.marker,
        # device, or device_map and max_memory: blocks split across GPUs (a map that offloads to
        # disk was refused before the stage ran, so training needs no offload folder)
        **{k: v for k, v in config.model.placement().items() if k != "offload_folder"},
        chat_template=_chat_template(config),
        progress=False,  # one bar over the adapters instead
    )
    return {f"adapter:{source}:seed{seed}": str(folder / "adapter")}


def _eval_unit(config: StudyConfig, inputs: _Inputs, out: Path, unit: Unit, **kw: Any) -> dict[str, str]:
    from persona_geometry.eval import source_rates

    source, seed = unit.args
    folder = Path(unit.folder)
    e = config.eval
    source_rates(
        config.model.name,
        out / "train" / source / f"seed{seed}" / "adapter",
        inputs.personas,
        list(inputs.questions),
        source=source,
        seed=e.seed + seed,
        out_dir=folder,
        **_eval_kwargs(config),
        progress=False,  # one bar over the adapters instead
    )
    return {f"eval:{source}:seed{seed}": str(folder / "run_result.json")}


def _eval_kwargs(config: StudyConfig) -> dict[str, Any]:
    """Returns the sampling and placement arguments every eval unit shares."""
    e, m = config.eval, config.model
    kwargs: dict[str, Any] = dict(
        n_completions=e.n_completions,
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        backend=e.backend,
        marker=config.data.marker,
        regex=e.regex,
        batch_size=e.batch_size,
        vllm_kwargs=_tensor_parallel(e.tensor_parallel_size),
        device=m.device,
        dtype=m.dtype,
        chat_template=_chat_template(config),
    )
    if m.device_map is not None and e.backend == "hf":
        placement = m.placement()
        kwargs["device"] = placement.pop("device")
        kwargs["placement"] = placement
    return kwargs


def _tensor_parallel(size: int) -> dict[str, Any] | None:
    return {"tensor_parallel_size": size} if size > 1 else None


_UNIT_RUNNERS = {"extract": _extract_unit, "data": _data_unit, "train": _train_unit, "eval": _eval_unit}


def _counts(config: StudyConfig, inputs: _Inputs, out: Path) -> tuple[dict[str, tuple[int, int]], Any]:
    """Returns pooled source counts ``{source: (k, n)}`` and the leakage table (source × target rates)."""
    import json

    import pandas as pd

    pooled: dict[str, tuple[int, int]] = {}
    leak_k: dict[str, dict[str, int]] = {}
    leak_n: dict[str, dict[str, int]] = {}
    for source, seed in _units(config, inputs):
        path = out / "eval" / source / f"seed{seed}" / "run_result.json"
        if not path.is_file():
            raise ValueError(f"Missing {path}: run the 'eval' stage first.")
        result = json.loads(path.read_text())
        rates = {row["persona"]: row for row in result["personas"]}
        if source not in rates:
            # The reference study lost its source's rate to a renamed key; never silently.
            raise ValueError(f"{path} has no entry for its source persona {source!r}.")
        k, n = pooled.get(source, (0, 0))
        pooled[source] = (k + rates[source]["k"], n + rates[source]["n"])
        for target, row in rates.items():
            leak_k.setdefault(source, {}).setdefault(target, 0)
            leak_n.setdefault(source, {}).setdefault(target, 0)
            leak_k[source][target] += row["k"]
            leak_n[source][target] += row["n"]
    leakage = pd.DataFrame(
        {s: {t: leak_k[s][t] / leak_n[s][t] for t in leak_k[s]} for s in leak_k}
    ).T.reindex(index=list(leak_k), columns=inputs.personas.names)
    return pooled, leakage


def _geometry(config: StudyConfig, out: Path) -> tuple[Any, Any, Any]:
    from persona_geometry.geometry import center, centroids, cosine_to_reference, pairwise_cosine

    acts = _extracted(out, "activations")
    cents = centroids(acts, hook=config.geometry.hook)
    c = config.geometry.centering
    if isinstance(c, str):
        reference_set = centroids(_extracted(out, "centering_activations"), hook=config.geometry.hook)
        centered = center(cents, reference_set)
    else:
        centered = center(cents, list(c) if c is not None else None)
    return acts, cosine_to_reference(centered, config.geometry.reference), pairwise_cosine(centered)


def _layer_sweep(config: StudyConfig, cos: Any, pooled: dict[str, tuple[int, int]], *, progress: bool = True) -> Any:
    """Returns the layer sweep over the personas with a source rate (seeded: the same every call)."""
    from persona_geometry.analysis.sweep import layer_sweep

    names = [p for p in cos.personas if p in pooled]
    reference = config.geometry.reference if config.geometry.reference in names else None
    a = config.analysis
    return layer_sweep(
        cos.to_wide().loc[names],
        k=[pooled[p][0] for p in names],
        n=[pooled[p][1] for p in names],
        reference=reference,
        exclude=[reference] if a.exclude_reference and reference else None,
        primary_layer=a.primary_layer,
        n_permutations=a.n_permutations,
        n_bootstrap=a.n_bootstrap,
        statistic=a.statistic,
        seed=a.seed,
        progress=progress,
    )


def _sweep(config: StudyConfig, inputs: _Inputs, out: Path, keys: dict[str, str], **kw: Any) -> dict[str, str]:
    _, cos, _ = _geometry(config, out)
    pooled, _ = _counts(config, inputs, out)
    sweep = _layer_sweep(config, cos, pooled, progress=kw["progress"])
    folder = out / "sweep"
    provenance = {"study": config.name, "package_versions": package_versions()}
    atomic_write_json(folder / "sweep.json", {**sweep.to_dict(), "provenance": provenance})
    atomic_write_text(folder / "sweep.csv", sweep.to_frame().to_csv(index=False))
    log.info("%s", sweep.summary())
    return {"sweep_json": str(folder / "sweep.json"), "sweep_csv": str(folder / "sweep.csv")}


def _report(config: StudyConfig, inputs: _Inputs, out: Path, keys: dict[str, str], **kw: Any) -> dict[str, str]:
    import json

    from persona_geometry.analysis import (
        check_static_export,
        leakage_correlation,
        robustness_at_layer,
        robustness_markdown,
    )

    check_static_export(config.figures.static_formats)  # before any file of the stage is written

    acts, cos, pairwise = _geometry(config, out)
    pooled, leakage = _counts(config, inputs, out)
    a = config.analysis
    names = [p for p in cos.personas if p in pooled]
    reference = config.geometry.reference if config.geometry.reference in names else None
    # Recomputed rather than read back: the sweep is seeded, so this is the sweep stage's result.
    sweep = _layer_sweep(config, cos, pooled, progress=kw["progress"])
    layer = a.layer if a.layer is not None else (a.primary_layer if a.primary_layer is not None else sweep.best_layer)
    at_layer = cos.at(layer)
    log_tokens = {p: math.log(float(acts.n_tokens[i].double().mean())) for i, p in enumerate(acts.personas.names)}
    categories = dict(zip(acts.personas.names, acts.personas.categories, strict=True))
    rob = robustness_at_layer(
        [at_layer[p] for p in names],
        k=[pooled[p][0] for p in names],
        n=[pooled[p][1] for p in names],
        personas=names,
        categories=[categories[p] for p in names],
        covariate=[log_tokens[p] for p in names] if a.covariate else None,
        covariate_name=a.covariate or "log_n_tokens",
        holdout=list(a.holdout),
        reference=reference,
        exclude_reference=a.exclude_reference,
        layer=layer,
    )
    folder = out / "report"
    leak = None
    if len(leakage.index) >= 3:
        try:
            leak = leakage_correlation(leakage, pairwise, n_permutations=min(a.n_permutations, 2000) or 1, seed=a.seed, progress=kw["progress"])
        except ValueError as e:  # e.g. a constant leakage matrix on a tiny model
            log.warning("pairwise leakage not computed: %s", e)
    payload = {
        **rob.to_dict(),
        "study": config.name,
        "model": config.model.name,
        "layer": layer,
        "layer_choice": "configured" if a.layer is not None else ("primary" if a.primary_layer is not None else "sweep best (exploratory)"),
        "sweep": sweep.to_dict(),
        "leakage": leak.to_dict() if leak is not None else None,
        "provenance": {"study": config.name, "config": config.to_dict(), "package_versions": package_versions()},
    }
    files = {"report_json": str(atomic_write_json(folder / "report.json", payload))}
    md = [robustness_markdown(rob, sweep, title=f"{config.name}: persona geometry vs marker source rate")]
    if leak is not None:
        md.append("## Pairwise leakage\n\n" + leak.summary() + "\n")
    figures = _report_figures(config, rob, sweep, pairwise, layer)
    md.append(_figures_markdown(figures, config.figures.formats))
    md.append(_provenance_markdown(config, layer, payload["layer_choice"]))
    files["report_md"] = str(atomic_write_text(folder / "report.md", "\n".join(md)))
    from persona_geometry.analysis.figures import write_figures

    f = config.figures
    for name, path in write_figures(figures, folder, formats=f.formats, width=f.width, height=f.height, scale=f.scale, plotlyjs=f.plotlyjs).items():
        files[f"figure_{name}"] = str(path)
    atomic_write_text(folder / "leakage.csv", leakage.to_csv())
    log.info("report written to %s", folder)
    json.dumps(payload)  # fail here, not in a reader, if anything is not JSON-safe
    return files


def _report_figures(config: StudyConfig, rob: Any, sweep: Any, pairwise: Any, layer: int) -> dict[str, Any]:
    """Returns the report's figures by file stem: scatter, sweep, heatmap (slider) and heatmap grid."""
    from persona_geometry.analysis.figures import (
        cosine_heatmap,
        cosine_heatmap_grid,
        default_grid_layers,
        hero_scatter,
        sweep_curve,
    )

    grid_layers = config.figures.grid_layers
    if grid_layers is None:
        grid_layers = default_grid_layers(pairwise.layers, primary=layer)
    else:
        for value in grid_layers:
            if value not in pairwise.layers:
                raise ValueError(f"The study config's 'figures.grid_layers' names layer {value}, which is not among the extracted layers {list(pairwise.layers)}.")
    return {
        # With held-out personas declared, the scatter draws them as stars against the fit without them.
        "scatter": hero_scatter(rob, title=f"{config.name}: source rate vs centered cosine"),
        "sweep": sweep_curve(sweep),
        "heatmap": cosine_heatmap(pairwise),
        "heatmap_grid": cosine_heatmap_grid(pairwise, grid_layers),
    }


def _figures_markdown(figures: dict[str, Any], formats: Sequence[str]) -> str:
    captions = {
        "scatter": "source rate vs centered cosine at the analysis layer, Wilson 95% bars, OLS prediction band",
        "sweep": "correlation per layer with bootstrap bands",
        "heatmap": "pairwise centered cosine, one layer per slider step",
        "heatmap_grid": "pairwise centered cosine at chosen layers (small multiples)",
    }
    lines = ["## Figures", ""]
    image = next((f for f in ("svg", "png", "jpeg", "jpg", "webp") if f in formats), None)
    for name in figures:
        links = " · ".join(f"[{name}.{fmt}]({name}.{fmt})" for fmt in formats)
        lines.append(f"- {captions.get(name, name)}: {links}")
    if image is not None:
        lines += [""] + [f"![{captions.get(name, name)}]({name}.{image})" for name in figures if name != "heatmap"]
    return "\n".join(lines) + "\n"


def _provenance_markdown(config: StudyConfig, layer: int, choice: str) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    return (
        "## Provenance\n\n"
        f"- model: `{config.model.name}` (revision {config.model.revision or 'default'}, dtype {config.model.dtype})\n"
        f"- robustness layer: {layer} ({choice})\n"
        f"- packages: {versions}\n"
    )
