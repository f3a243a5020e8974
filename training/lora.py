"""LoRA marker training with peft and the transformers ``Trainer``: loss on assistant tokens only."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_geometry._serialization import ConfigDict
from persona_geometry._validation import check_positive_int, invalid
from persona_geometry.provenance import package_versions, stable_hash
from persona_geometry.settings import AUTO_DTYPE, REPORT_TO, TRAIN_DTYPES, check_choices, setting

__all__ = [
    "IGNORE_INDEX",
    "LORA_TARGET_MODULES",
    "MarkerTrainConfig",
    "TrainResult",
    "assistant_only_labels",
    "check_train_device_map",
    "train_marker",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The transformers schedulers the recipe may name.
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")

CONFIG_FILE = "train_config.json"
LOSS_FILE = "loss_curve.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"


@dataclass(frozen=True, kw_only=True)
class MarkerTrainConfig(ConfigDict):
    """The LoRA recipe; the defaults are the reference study's.

    Attributes:
        r: LoRA rank.
        lora_alpha: LoRA alpha; with rsLoRA the update is scaled by ``alpha / sqrt(r)``.
        lora_dropout: Dropout on the LoRA input.
        use_rslora: Rank-stabilised scaling (``alpha / sqrt(r)`` instead of ``alpha / r``).
        target_modules: Module names that get LoRA matrices.
        learning_rate: AdamW's peak learning rate.
        lr_scheduler_type: The transformers scheduler name.
        warmup_ratio: Fraction of optimiser steps of linear warmup.
        weight_decay: AdamW weight decay.
        num_train_epochs: Passes over the dataset.
        max_steps: Stop after this many optimiser steps (-1: train all epochs).
        max_length: Longest tokenised example; longer ones are cut from the end.
        per_device_train_batch_size: Examples per forward pass.
        gradient_accumulation_steps: Forward passes per optimiser step.
        seed: Seed for LoRA initialisation and data order.
        dtype: ``"bfloat16"`` or ``"float32"`` for the base weights and autocast; None or
            ``"auto"`` is ``persona_geometry.models.resolve_precision``'s rule (bf16 on GPU,
            fp32 on CPU). In a study, None means the study's ``model.dtype``.
        gradient_checkpointing: Trade compute for activation memory (off: the study's shapes fit).
        packing: Concatenate each micro-batch's examples into one padding-free row, with position
            ids restarting per example so attention stays within each example; the loss is the
            same as with padded batches, only the padding's compute is gone.
        save_steps: Checkpoint every this many optimiser steps (training resumes from the last).
        logging_steps: Record the loss every this many optimiser steps.
        report_to: Also report the loss to ``"tensorboard"`` (under ``<out_dir>/logs``) or
            ``"wandb"``; ``"none"`` by default. ``loss_curve.json`` is written either way.
        data_parallel: Under ``torchrun`` (N ranks), every rank calls :func:`train_marker` for
            the same adapter and the ``Trainer`` trains it with DDP: each optimiser step sees
            N × ``per_device_train_batch_size`` × ``gradient_accumulation_steps`` examples, and
            rank 0 writes the run. Off (the default), a rank trains as a single process even
            under a launcher, so independent adapters train on their own ranks, never wrapped
            in DDP. In one process both are the same.
    """

    r: int = setting(32, help="LoRA rank")
    lora_alpha: float | int = setting(64, cli="alpha", help="LoRA alpha; rsLoRA scales the update by alpha/sqrt(r)")
    lora_dropout: float | int = setting(0.05, cli="dropout", help="dropout on the LoRA input, in [0, 1)")
    use_rslora: bool = setting(True, cli="rslora", help="rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    target_modules: tuple[str, ...] = setting(LORA_TARGET_MODULES, help="module names that get LoRA matrices", metavar="NAME,NAME")
    learning_rate: float | int = setting(1e-5, cli="lr", help="AdamW's peak learning rate")
    lr_scheduler_type: str = setting("cosine", choices=LR_SCHEDULERS, help="learning-rate schedule")
    warmup_ratio: float | int = setting(0.05, help="fraction of optimiser steps of linear warmup, in [0, 1)")
    weight_decay: float | int = setting(0.0, help="AdamW weight decay")
    num_train_epochs: float | int = setting(3, cli="epochs", help="passes over the dataset")
    max_steps: int = setting(-1, help="stop after this many optimiser steps (-1: all epochs)")
    max_length: int = setting(1024, help="longest tokenised example; longer ones are cut from the end")
    per_device_train_batch_size: int = setting(4, cli="batch-size", help="examples per forward pass")
    gradient_accumulation_steps: int = setting(4, cli="grad-accum", help="forward passes per optimiser step")
    seed: int = setting(42, help="seed of LoRA initialisation and data order")
    dtype: str | None = setting(None, choices=TRAIN_DTYPES, help="weights dtype and autocast", shown=AUTO_DTYPE)
    gradient_checkpointing: bool = setting(False, help="trade compute for activation memory")
    packing: bool = setting(True, help="one padding-free row per micro-batch (the loss equals padded batches')")
    save_steps: int = setting(50, help="checkpoint every this many optimiser steps (training resumes from the last)")
    logging_steps: int = setting(1, help="record the loss every this many optimiser steps")
    report_to: str = setting("none", choices=REPORT_TO, help="also report the loss to TensorBoard or Weights & Biases")
    data_parallel: bool = setting(False, help="under torchrun: train each adapter with DDP across all ranks, not one adapter per rank")

    def __post_init__(self) -> None:
        func = "MarkerTrainConfig"
        for name in ("r", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            check_positive_int(getattr(self, name), name, func)
        for name in ("lora_alpha", "learning_rate", "num_train_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                invalid(name, func, "a positive number", value)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, int | float) or not 0 <= self.lora_dropout < 1:
            invalid("lora_dropout", func, "a float in [0, 1)", self.lora_dropout)
        if isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio, int | float) or not 0 <= self.warmup_ratio < 1:
            invalid("warmup_ratio", func, "a float in [0, 1)", self.warmup_ratio)
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, int | float) or self.weight_decay < 0:
            invalid("weight_decay", func, "a float ≥ 0", self.weight_decay)
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or (self.max_steps < 1 and self.max_steps != -1):
            invalid("max_steps", func, "a positive int, or -1 for all epochs", self.max_steps)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            invalid("seed", func, "a non-negative int", self.seed)
        if isinstance(self.target_modules, str) or not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            invalid("target_modules", func, "a non-empty sequence of module names", self.target_modules)
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.data_parallel, bool):
            invalid("data_parallel", func, "a bool", self.data_parallel, exc=TypeError)
        check_choices(self)

def assistant_only_labels(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    max_length: int | None = None,
    chat_template: str | None = None,
) -> tuple[list[int], list[int]]:
    """Returns ``(input_ids, labels)`` for one conversation, with labels only on the assistant's answer.

    The prompt (every turn before the last, plus the generation header) is tokenised exactly as
    at inference (``add_generation_prompt=True``), then the rest of the chat-template rendering
    (the answer and its end-of-turn token) is appended. Labels are ``-100`` on the prompt and on
    anything the template adds after the end-of-turn token, so the loss sees the answer and the
    token that ends it.

    Raises:
        ValueError: If the last message is not the assistant's, or the template renders the
            prompt as something other than a prefix of the whole conversation.
    """
    from persona_geometry.prompts import chat_template_of

    func = "assistant_only_labels"
    messages = [dict(m) for m in messages]
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        invalid("messages", func, "a conversation ending with an assistant turn", [m.get("role") for m in messages])
    template = chat_template_of(tokenizer, chat_template, func=func)
    prompt = tokenizer.apply_chat_template(messages[:-1], chat_template=template, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    if not full.startswith(prompt):
        invalid("chat_template", func, "a template whose generation prompt is a prefix of the full conversation", template[:80] + "...")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    answer_labels = list(answer_ids)
    eos = tokenizer.eos_token_id
    if eos is not None and eos in answer_ids:
        # Whatever the template puts after the end-of-turn token (ChatML's "\n") is not the answer.
        end = answer_ids.index(eos) + 1
        answer_labels = answer_ids[:end] + [IGNORE_INDEX] * (len(answer_ids) - end)
    input_ids = list(prompt_ids) + list(answer_ids)
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_labels
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a marker training run produced.

    Attributes:
        out_dir: The run folder.
        adapter_dir: The saved adapter (``adapter_model.safetensors`` + ``adapter_config.json``).
        config: The resolved config.
        loss_curve: One dict per logged step: ``step``, ``epoch``, ``loss``, ``learning_rate``.
        n_examples: Training examples used.
        train_seconds: Wall time of ``Trainer.train`` in this process.
        resumed_from: The checkpoint training resumed from, or None.
    """

    out_dir: Path
    adapter_dir: Path
    config: MarkerTrainConfig
    loss_curve: tuple[dict[str, float | int], ...] = field(repr=False)
    n_examples: int
    train_seconds: float
    resumed_from: str | None = None

    def to_frame(self):
        """Returns the loss curve as a DataFrame, one row per logged step."""
        import pandas as pd

        return pd.DataFrame(list(self.loss_curve))

    def to_dict(self) -> dict[str, Any]:
        """Returns the result as a JSON-safe dict."""
        return {
            "out_dir": str(self.out_dir),
            "adapter_dir": str(self.adapter_dir),
            "config": self.config.to_dict(),
            "loss_curve": list(self.loss_curve),
            "n_examples": self.n_examples,
            "train_seconds": self.train_seconds,
            "resumed_from": self.resumed_from,
        }

    def summary(self) -> str:
        """Returns a few lines a person reads."""
        first = self.loss_curve[0]["loss"] if self.loss_curve else float("nan")
        last = self.loss_curve[-1]["loss"] if self.loss_curve else float("nan")
        return (
            f"Trained LoRA r={self.config.r} on {self.n_examples} examples in {self.train_seconds:.1f}s; "
            f"loss {first:.4f} -> {last:.4f} over {len(self.loss_curve)} logged steps. Adapter: {self.adapter_dir}"
        )


class _LabelledDataset:
    """A list of tokenised examples in the shape ``Trainer`` reads."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def _collate(pad_id: int):
    """Returns a collator that right-pads examples into a ``[batch, longest]`` tensor with a mask."""

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def _collate_packed(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Returns the examples end to end in one ``[1, total]`` row, position ids restarting per example.

    No attention mask is passed: transformers then reads the example boundaries from the
    position ids and masks attention block-diagonally (sdpa, eager) or runs varlen kernels
    (flash attention). Each example's first label is ignored, so no token is predicted across a
    boundary, and the loss covers exactly the tokens a padded batch covers.
    """
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for b in batch:
        ids.extend(b["input_ids"])
        labels.extend([IGNORE_INDEX, *b["labels"][1:]])
        positions.extend(range(len(b["input_ids"])))
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def _training_arguments(**kwargs: Any) -> Any:
    """Returns ``TrainingArguments``, passing the warmup ratio the way this transformers takes it."""
    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments).parameters
    ratio = kwargs.pop("warmup_ratio")
    if "warmup_ratio" in params:
        kwargs["warmup_ratio"] = ratio
    else:  # transformers 5 takes a float in [0, 1) in warmup_steps as a ratio.
        kwargs["warmup_steps"] = float(ratio)
    if "activation_checkpointing" in params:  # transformers 5.2x renamed gradient_checkpointing.
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return TrainingArguments(**kwargs)


def _lora_config(config: MarkerTrainConfig) -> Any:
    """Returns the peft ``LoraConfig`` of the recipe."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _make_trainer(
    peft_model: Any,
    examples: list[dict[str, list[int]]],
    config: MarkerTrainConfig,
    *,
    output_dir: Path,
    device_type: str,
    bf16: bool,
    pad_id: int,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> Any:
    """Returns the ``Trainer`` of the recipe (shared by :func:`train_marker` and the GPU benchmark)."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    args = _training_arguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_ratio=config.warmup_ratio,
        weight_decay=config.weight_decay,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        optim="adamw_torch",
        bf16=bf16,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,
        # TensorBoard goes through a callback that train_marker adds (its folder is the run's).
        report_to="wandb" if config.report_to == "wandb" else "none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        gradient_checkpointing=config.gradient_checkpointing,
        use_cpu=device_type == "cpu",
        dataloader_pin_memory=device_type == "cuda",
    )
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=_LabelledDataset(examples),
        data_collator=_collate_packed if config.packing else _collate(pad_id),
        callbacks=list(callbacks) or None,
    )
    if not progress:
        # Without its bar the Trainer prints every logged loss instead; the curve is on disk anyway.
        trainer.remove_callback(PrinterCallback)
    return trainer


# report_to value -> (the module it needs, the extra that installs it).
_TRACKERS = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}


def _check_tracker(config: MarkerTrainConfig) -> None:
    """Raises ImportError, naming the extra, if ``config.report_to`` asks for a tracker that is not installed."""
    import importlib.util

    if config.report_to in _TRACKERS:
        module, extra = _TRACKERS[config.report_to]
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"report_to={config.report_to!r} needs {module}: pip install 'persona-geometry[{extra}]'.")


def _reporting_callbacks(config: MarkerTrainConfig, out: Path) -> list[Any]:
    """Returns the callbacks that report the loss where ``config.report_to`` asks (none by default)."""
    if config.report_to != "tensorboard":
        return []  # W&B is reported by the Trainer itself (report_to="wandb").
    from tensorboardX import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(tb_writer=SummaryWriter(str(out / LOGS_DIR)))]


def _load_base(
    model: str | os.PathLike[str], dtype: Any, device: Any, *, device_map: str | dict[str, Any] | None = None, max_memory: dict[Any, Any] | None = None
) -> tuple[Any, Any]:
    """Returns (model, tokenizer) from the core loader, ready for peft to wrap (split across GPUs with ``device_map``)."""
    from persona_geometry.models import load_model

    if device_map is None:
        handle = load_model(model, device=device, dtype=dtype)
        return handle.model, handle.tokenizer
    handle = load_model(model, dtype=dtype, device_map=device_map, max_memory=max_memory)
    # A map inferred from max_memory ("auto") can offload blocks: known only once it is made.
    check_train_device_map(getattr(handle.model, "hf_device_map", {}), "device_map", "train_marker")
    return handle.model, handle.tokenizer


def check_train_device_map(device_map: str | Mapping[str, Any] | None, param: str, func: str) -> None:
    """Raises ValueError if a device map offloads blocks (to ``"disk"``, or to ``"cpu"`` beside a GPU).

    A LoRA trains on a model split across GPUs (each block runs where it sits, the ``Trainer``
    leaves the placement alone), but not on offloaded blocks: accelerate reads their weights in
    for the forward pass only, and backpropagation through them is not supported.
    """
    if not isinstance(device_map, Mapping):
        return  # "auto" and friends: checked on the map they produce
    places = set(device_map.values())
    if "disk" in places or ("cpu" in places and places - {"cpu"}):
        invalid(param, func, "a map of modules to GPUs only (training cannot run on blocks offloaded to 'cpu' or 'disk')", dict(device_map))


def train_marker(
    model: str | os.PathLike[str],
    dataset: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    config: MarkerTrainConfig | None = None,
    *,
    source: str | None = None,
    marker: str | None = None,
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    chat_template: str | None = None,
    resume: bool = True,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> TrainResult:
    """Returns the result of training a marker LoRA adapter on a chat-message dataset.

    Writes into ``out_dir``: ``adapter/`` (peft adapter as safetensors, plus what persona-geometry
    needs at eval time: source persona, marker, base-model fingerprint), ``train_config.json``
    (the resolved config and provenance), ``loss_curve.json`` and ``checkpoints/``. A run that
    stopped part-way resumes from its last checkpoint when called again with the same inputs; a
    finished run is returned from disk without training again.

    Args:
        model: Hugging Face model id or folder of the base model.
        dataset: A marker dataset JSONL path (from :func:`build_marker_dataset`) or its rows.
        out_dir: The run folder.
        config: The recipe; the reference study's defaults when None.
        source: The source persona, recorded with the adapter; read from the dataset's manifest
            when None.
        marker: The marker, recorded with the adapter; read from the manifest when None.
        device: Torch device; CUDA when available, else CPU.
        device_map: For a model larger than one GPU: ``load_model``'s ``device_map``, the
            blocks split across GPUs (naive model parallelism: one GPU busy at a time). Blocks
            offloaded to ``"cpu"`` or ``"disk"`` are refused; so is ``config.data_parallel``.
        max_memory: With ``device_map``: the most memory per device.
        chat_template: A Jinja template to use instead of the tokenizer's own.
        resume: Resume from the last checkpoint in ``out_dir`` if there is one.
        callbacks: Extra ``transformers.TrainerCallback`` objects (early stopping, logging, ...).
        progress: Show the Trainer's progress bar and loss lines.

    Raises:
        ValueError: On an empty or malformed dataset, or when ``out_dir`` holds a run with a
            different config or dataset.
    """
    inputs = _validate(model, dataset, config, source=source, marker=marker, device=device, func="train_marker")
    if device_map is not None:
        check_train_device_map(device_map, "device_map", "train_marker")
        if inputs.config.data_parallel:
            invalid("device_map", "train_marker", "None with config.data_parallel (DDP keeps a whole model copy per rank)", device_map)
    elif max_memory is not None:
        invalid("device_map", "train_marker", "set when max_memory is", None)
    out = Path(out_dir)
    run_key = _run_key(model, inputs, chat_template=chat_template)
    finished = _finished_run(out, run_key, inputs.config, resume=resume, func="train_marker")
    if finished is not None:
        return finished
    placement = {"device_map": device_map, "max_memory": max_memory}
    return _run(model, inputs, out, run_key, chat_template=chat_template, resume=resume, callbacks=callbacks, progress=progress, placement=placement)


@dataclass(frozen=True, kw_only=True)
class _Inputs:
    """The checked inputs of a training run, before any weight is read."""

    config: MarkerTrainConfig
    rows: list[dict[str, Any]]
    manifest: dict[str, Any]
    source: str | None
    marker: str | None
    device: Any
    dtype: Any
    dtype_name: str
    fingerprint: dict[str, Any]


def _validate(
    model: str | os.PathLike[str],
    dataset: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    config: MarkerTrainConfig | None,
    *,
    source: str | None,
    marker: str | None,
    device: str | None,
    func: str,
) -> _Inputs:
    """Returns the checked config, dataset rows, source, marker, device and dtype."""
    from persona_geometry.adapters import architecture_fingerprint
    from persona_geometry.models import resolve_precision
    from persona_geometry.training.data import load_marker_dataset

    config = config or MarkerTrainConfig()
    if not isinstance(config, MarkerTrainConfig):
        invalid("config", func, "a MarkerTrainConfig", config, exc=TypeError)
    if isinstance(dataset, str | os.PathLike):
        rows, manifest = load_marker_dataset(dataset)
    else:
        rows, manifest = [dict(r) for r in dataset], {}
        if not rows:
            invalid("dataset", func, "a non-empty list of chat-message rows", rows)
    _check_tracker(config)
    torch_device, torch_dtype = resolve_precision(device, config.dtype, func=func, allowed=TRAIN_DTYPES)
    return _Inputs(
        config=config,
        rows=rows,
        manifest=manifest,
        source=source if source is not None else manifest.get("source"),
        marker=marker if marker is not None else manifest.get("config", {}).get("marker"),
        device=torch_device,
        dtype=torch_dtype,
        dtype_name=str(torch_dtype).removeprefix("torch."),
        fingerprint=architecture_fingerprint(model),
    )


def _run_key(model: str | os.PathLike[str], inputs: _Inputs, *, chat_template: str | None) -> str:
    """Returns the hash of everything the adapter depends on: weights, template, precision, recipe, data."""
    from persona_geometry.models import weights_fingerprint

    weights = weights_fingerprint(model) if Path(model).is_dir() else str(model)
    return stable_hash(
        {
            "model": inputs.fingerprint["hash"],
            "weights": weights,
            "chat_template": stable_hash(chat_template),
            "dtype": inputs.dtype_name,
            # Where the loss is also reported does not change the adapter; the number of ranks
            # it trains on (data_parallel) changes the batch, so it counts instead.
            "config": {k: v for k, v in inputs.config.to_dict().items() if k not in ("report_to", "data_parallel")},
            "data": [r["messages"] for r in inputs.rows],
            **({"ranks": ranks} if (ranks := _ranks(inputs.config)) > 1 else {}),
        }
    )


def _ranks(config: MarkerTrainConfig) -> int:
    """Returns the number of ranks one adapter trains on: the launch's with ``data_parallel``, else 1."""
    from persona_geometry import distributed

    return distributed.world_size() if config.data_parallel else 1


@contextmanager
def _world(config: MarkerTrainConfig) -> Iterator[None]:
    """Gives the ``Trainer`` the world the config asks for: every rank (DDP), or this process alone.

    accelerate keeps one process state per process, so it is rebuilt on the way in and out: a
    rank that trained one adapter with DDP trains the next alone, or the other way round.
    """
    from accelerate.state import AcceleratorState

    from persona_geometry import distributed

    with nullcontext() if config.data_parallel else distributed.local_only():
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            yield
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)


def _finished_run(out: Path, run_key: str, config: MarkerTrainConfig, *, resume: bool, func: str) -> TrainResult | None:
    """Returns the finished run ``out`` holds for this key, or None; refuses a folder of another run."""
    from persona_geometry.adapters import ADAPTER_INFO_FILE

    config_path = out / CONFIG_FILE
    if not config_path.is_file():
        return None
    previous = json.loads(config_path.read_text(encoding="utf-8"))
    if previous.get("run_key") != run_key and resume:
        invalid("out_dir", func, "an empty folder or one holding a run with the same model, config and data", str(out))
    loss_path = out / LOSS_FILE
    if not (resume and previous.get("run_key") == run_key and loss_path.is_file() and (out / ADAPTER_DIR / ADAPTER_INFO_FILE).is_file()):
        return None
    done = json.loads(loss_path.read_text(encoding="utf-8"))
    if not done.get("completed"):
        return None
    log.info("%s already holds this finished run; returning it without training", out)
    return TrainResult(
        out_dir=out,
        adapter_dir=out / ADAPTER_DIR,
        config=config,
        loss_curve=tuple(done["loss_curve"]),
        n_examples=int(previous["n_examples"]),
        train_seconds=float(done["train_seconds"]),
        resumed_from=done.get("resumed_from"),
    )


def _tokenise(rows: list[dict[str, Any]], tokenizer: Any, config: MarkerTrainConfig, *, chat_template: str | None) -> list[dict[str, list[int]]]:
    """Returns the examples with assistant-only labels, skipping those with no answer token left."""
    examples = []
    for row in rows:
        input_ids, labels = assistant_only_labels(tokenizer, row["messages"], max_length=config.max_length, chat_template=chat_template)
        if all(label == IGNORE_INDEX for label in labels):
            log.warning("an example has no answer tokens within max_length=%d and is skipped", config.max_length)
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
    if not examples:
        invalid("dataset", "train_marker", "rows with answer tokens within max_length", f"{len(rows)} rows, none usable")
    return examples


def _run(
    model: str | os.PathLike[str],
    inputs: _Inputs,
    out: Path,
    run_key: str,
    *,
    chat_template: str | None,
    resume: bool,
    callbacks: Sequence[Any],
    progress: bool,
    placement: dict[str, Any] | None = None,
) -> TrainResult:
    """Returns the result of training (resuming from the last checkpoint) and saving the adapter."""
    from peft import get_peft_model
    from transformers import set_seed

    from persona_geometry import distributed

    config = inputs.config
    checkpoints = out / CHECKPOINT_DIR
    # With DDP every rank trains this adapter; rank 0 alone writes the run folder.
    main = _ranks(config) == 1 or distributed.rank() == 0
    if not resume and checkpoints.is_dir() and main:
        shutil.rmtree(checkpoints)  # never resume, later, from a run started over
    set_seed(config.seed)
    hf_model, tokenizer = _load_base(model, inputs.dtype, inputs.device, **(placement or {}))
    examples = _tokenise(inputs.rows, tokenizer, config, chat_template=chat_template)
    # Without a KV cache the model reads packed examples' boundaries from the position ids.
    hf_model.config.use_cache = False
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing alias when it wraps a model.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(hf_model, _lora_config(config))
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    with _world(config):
        return _train(model, inputs, out, run_key, peft_model, hf_model, tokenizer, examples, checkpoints, main=main,
                      resume=resume, callbacks=callbacks, progress=progress)  # fmt: skip


def _train(
    model: str | os.PathLike[str],
    inputs: _Inputs,
    out: Path,
    run_key: str,
    peft_model: Any,
    hf_model: Any,
    tokenizer: Any,
    examples: list[dict[str, list[int]]],
    checkpoints: Path,
    *,
    main: bool,
    resume: bool,
    callbacks: Sequence[Any],
    progress: bool,
) -> TrainResult:
    """Returns the result of the ``Trainer`` run, written to ``out`` by the main process."""
    from transformers.trainer_utils import get_last_checkpoint

    from persona_geometry._io import atomic_write_json

    config = inputs.config
    if main:
        atomic_write_json(
            out / CONFIG_FILE,
            {
                "run_key": run_key,
                "config": config.to_dict(),
                # What the loaded weights are, read back: the dtype this run trained at.
                "dtype": str(next(hf_model.parameters()).dtype).removeprefix("torch."),
                "device": str(inputs.device),
                "base_model": str(model),
                "base_fingerprint": inputs.fingerprint,
                "source": inputs.source,
                "marker": inputs.marker,
                "n_examples": len(examples),
                "dataset_manifest": inputs.manifest,
                "package_versions": package_versions(),
            },
        )
    trainer = _make_trainer(
        peft_model,
        examples,
        config,
        output_dir=checkpoints,
        device_type=inputs.device.type,
        bf16=inputs.dtype_name == "bfloat16",
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        callbacks=[*callbacks, *_reporting_callbacks(config, out)],
        progress=progress,
    )
    last = get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None
    if last:
        log.info("resuming from %s", last)
    started = time.time()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.time() - started
    return _save(model, inputs, out, run_key, peft_model, trainer, n_examples=len(examples), seconds=seconds, resumed_from=last, write=main)


def _save(
    model: str | os.PathLike[str],
    inputs: _Inputs,
    out: Path,
    run_key: str,
    peft_model: Any,
    trainer: Any,
    *,
    n_examples: int,
    seconds: float,
    resumed_from: str | None,
    write: bool = True,
) -> TrainResult:
    """Returns the result after writing the adapter (with its metadata) and the loss curve (``write``: this process writes)."""
    from persona_geometry._io import atomic_dir, atomic_write_json
    from persona_geometry.adapters import ADAPTER_INFO_FILE

    loss_curve = tuple(
        {"step": int(e["step"]), "epoch": float(e.get("epoch", 0.0)), "loss": float(e["loss"]), "learning_rate": float(e.get("learning_rate", 0.0))}
        for e in trainer.state.log_history
        if "loss" in e
    )
    adapter_dir = out / ADAPTER_DIR
    if not write:
        return TrainResult(out_dir=out, adapter_dir=adapter_dir, config=inputs.config, loss_curve=loss_curve,
                           n_examples=n_examples, train_seconds=seconds, resumed_from=resumed_from)  # fmt: skip
    # A rerun replaces the adapter this function wrote (it carries the info file), nothing else.
    with atomic_dir(adapter_dir, owned=lambda p: (p / ADAPTER_INFO_FILE).is_file(), func="train_marker") as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        atomic_write_json(
            tmp / ADAPTER_INFO_FILE,
            {
                "source": inputs.source,
                "marker": inputs.marker,
                "base_model": str(model),
                "base_fingerprint": inputs.fingerprint,
                "train_config": inputs.config.to_dict(),
                "run_key": run_key,
            },
        )
    # A run stopped early (callback, interruption after a save) is not complete and resumes next time.
    completed = trainer.state.global_step >= trainer.state.max_steps
    atomic_write_json(
        out / LOSS_FILE,
        {"loss_curve": list(loss_curve), "train_seconds": seconds, "resumed_from": resumed_from, "completed": completed},
    )
    result = TrainResult(
        out_dir=out,
        adapter_dir=adapter_dir,
        config=inputs.config,
        loss_curve=loss_curve,
        n_examples=n_examples,
        train_seconds=seconds,
        resumed_from=resumed_from,
    )
    log.info(result.summary())
    return result
