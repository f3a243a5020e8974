"""``StudyConfig``: one YAML file describes a whole study, validated before any model loads.

A study file has these sections (every key optional except ``model.name``)::

    name: qwen7b-zlt
    out: runs/qwen7b-zlt
    model: {name: Qwen/Qwen2.5-7B-Instruct, revision: null, dtype: bfloat16, device: cuda}
    personas: builtin            # or a YAML/JSON persona file
    questions: builtin           # probe questions: or a .txt/.yaml/.json file
    training_questions: builtin  # questions for marker data: or a file
    extract: {hooks: [resid_post], layers: null, engine: hf, batch_tokens: 16384}
    geometry: {reference: helpful_assistant, centering: null}
    marker: {sources: all, seeds: [42]}
    data: {marker: "[ZLT]", n_source: 200, n_bystander_personas: 2, n_per_bystander: 200, exclude: []}
    responses: {temperature: 1.0, top_p: 0.95, max_new_tokens: 512, seed: 0}
    train: {r: 32, lora_alpha: 64, learning_rate: 1.0e-5, ...}   # MarkerTrainConfig
    eval: {backend: vllm, n_completions: 5, temperature: 1.0, top_p: 0.95, max_new_tokens: 512}
    analysis: {primary_layer: 20, holdout: [], covariate: log_n_tokens, n_permutations: 10000}
    figures: {formats: [html], width: null, height: null, scale: 1, grid_layers: null, plotlyjs: directory}

An unknown key or a bad value is one ``ValueError`` naming the key (``train.lr``), raised by
``StudyConfig.from_dict``/``load`` before anything expensive happens.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from persona_geometry._serialization import ConfigDict, coerce_fields
from persona_geometry._validation import check_one_of, check_positive_int, invalid
from persona_geometry.sampling import SamplingSettings
from persona_geometry.settings import (
    AUTO_DTYPE,
    BACKENDS,
    DTYPES,
    ENGINES,
    FIGURE_FORMATS,
    HOOK_POINTS,
    PLOTLYJS_MODES,
    STATISTICS,
    TRAIN_DTYPES,
    check_choices,
    setting,
)
from persona_geometry.training.data import MarkerDataRecipe
from persona_geometry.training.lora import MarkerTrainConfig

__all__ = [
    "AnalysisConfig",
    "EvalConfig",
    "ExtractConfig",
    "FigureConfig",
    "GeometryConfig",
    "MarkerConfig",
    "ModelConfig",
    "ResponsesConfig",
    "StudyConfig",
    "DataConfig",
]

_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# torch's device types, with an optional index: checked here so a typo fails before torch loads.
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu|meta|xla|ipu|mtia|privateuseone)(:\d+)?")
# More completions per prompt than any study needs: a typo (1e12) is refused, not queued.
MAX_COMPLETIONS = 100_000


def _check_bools(obj: Any, func: str) -> None:
    """Refuses a non-bool in a field typed ``bool`` (YAML's ``"yes"`` in quotes is a string, not true)."""
    for f in fields(obj):
        if f.type in (bool, "bool") and not isinstance(getattr(obj, f.name), bool):
            invalid(f.name, func, "true or false", getattr(obj, f.name), exc=TypeError)


def _check_finite_temperature(obj: Any, func: str) -> None:
    if isinstance(obj.temperature, float) and not math.isfinite(obj.temperature):
        invalid("temperature", func, "a finite float ≥ 0 (0 means greedy)", obj.temperature)
    if isinstance(obj.n_completions, int) and obj.n_completions > MAX_COMPLETIONS:
        invalid("n_completions", func, f"a positive int of at most {MAX_COMPLETIONS:,}", obj.n_completions)


def check_template_syntax(template: str, source: str = "model.chat_template") -> None:
    """Raises a one-line ValueError naming ``source`` when ``template`` is not valid Jinja."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as e:
        raise ValueError(
            f"The 'chat_template' parameter of ModelConfig must be a valid Jinja template. Got {source} with "
            f"a syntax error on line {e.lineno}: {' '.join(str(e.message).split())}"
        ) from e


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ConfigDict):
    """Which model to study: a Hugging Face id (from the local cache) or a local folder, and the
    device and dtype every stage runs at (extraction, responses, training, evaluation)."""

    name: str = setting(help="a local model folder or a Hugging Face id (from the local cache when offline)", cli="model")
    revision: str | None = setting(None, help="a hub branch, tag or commit (hub ids only)", shown="the cached default")
    dtype: str = setting("auto", choices=DTYPES, help="weights dtype", shown=AUTO_DTYPE)
    device: str | None = setting(None, help="torch device: cpu, cuda, cuda:1, ...", shown="cuda when available")
    chat_template: str | None = setting(None, help="a Jinja chat template, or a file holding one", shown="the tokenizer's own")
    device_map: str | dict[str, Any] | None = setting(
        None, help=f"a model larger than one GPU: accelerate's device_map, one of {list(_DEVICE_MAPS)} or {{module: device}}", shown="one device"
    )
    max_memory: dict[Any, Any] | None = setting(None, help="with device_map: the most memory per device, e.g. {0: 70GiB, cpu: 200GiB}", shown="all of it")
    offload_folder: str | None = setting(None, help="with device_map: the folder for the blocks the map puts on disk", shown="none")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            invalid("name", "ModelConfig", "a model id or folder", self.name)
        check_choices(self)
        if isinstance(self.device_map, str):
            check_one_of(self.device_map, "device_map", "ModelConfig", _DEVICE_MAPS)
        elif self.device_map is not None and not isinstance(self.device_map, dict):
            invalid("device_map", "ModelConfig", f"null, one of {list(_DEVICE_MAPS)} or a mapping of module to device", self.device_map, exc=TypeError)
        if self.max_memory is not None:
            if not isinstance(self.max_memory, dict) or self.device_map is None:
                invalid("max_memory", "ModelConfig", "null, or a mapping of device to memory (e.g. {0: 70GiB}) with device_map set", self.max_memory)
            # One key type (text), so the config hashes and round-trips; load_model gets GPU indices back as ints.
            object.__setattr__(self, "max_memory", {str(k): str(v) for k, v in self.max_memory.items()})
        if self.offload_folder is not None and (not isinstance(self.offload_folder, str) or not self.offload_folder.strip() or self.device_map is None):
            invalid("offload_folder", "ModelConfig", "null, or a folder with device_map set", self.offload_folder)
        if isinstance(self.device_map, dict) and "disk" in self.device_map.values() and self.offload_folder is None:
            invalid("offload_folder", "ModelConfig", "a folder when device_map puts blocks on 'disk'", None)
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            invalid("chat_template", "ModelConfig", "null, a Jinja template or a template file", self.chat_template, exc=TypeError)
        if self.chat_template is not None and not _is_path(self.chat_template):
            check_template_syntax(self.chat_template, "the inline template")
        if self.device is not None and (not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device.strip().lower())):
            invalid("device", "ModelConfig", "a torch device such as cpu, cuda, cuda:1 or mps", self.device)

    def placement(self) -> dict[str, Any]:
        """Returns ``load_model``'s placement arguments: ``device``, or ``device_map``, ``max_memory`` and ``offload_folder``."""
        if self.device_map is None:
            return {"device": self.device}
        memory = None if self.max_memory is None else {int(k) if k.isdigit() else k: v for k, v in self.max_memory.items()}
        return {"device": self.device, "device_map": self.device_map, "max_memory": memory, "offload_folder": self.offload_folder}

    def template_text(self) -> str | None:
        """Returns the chat template to use: the file's text when ``chat_template`` is a path.

        Raises:
            ValueError: If ``chat_template`` names a file that does not exist.
        """
        if not _is_path(self.chat_template):
            return self.chat_template
        from persona_geometry._serialization import read_text_file

        path = Path(self.chat_template)
        if not path.is_file():
            invalid("chat_template", "ModelConfig", "a Jinja template or an existing template file", str(path))
        text = read_text_file(path, param="chat_template", func="ModelConfig")
        check_template_syntax(text, repr(str(path)))
        return text


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(ConfigDict):
    """Which activations to cache."""

    hooks: tuple[str, ...] = setting(("resid_post",), choices=HOOK_POINTS, help="hook points to keep", metavar="HOOK,HOOK")
    layers: tuple[int, ...] | None = setting(None, help="block indices (negative count from the end)", shown="all", metavar="L,L")
    engine: str = setting("hf", choices=ENGINES, help="extraction engine")
    batch_tokens: int | None = setting(None, help="most padded tokens per batch", shown="the engine's default")
    compile_blocks: bool | None = setting(
        None, help="run each decoder block through torch.compile (packed engine)", shown="on a GPU"
    )

    def __post_init__(self) -> None:
        if self.compile_blocks is not None and not isinstance(self.compile_blocks, bool):
            invalid("compile_blocks", "ExtractConfig", "true, false or null", self.compile_blocks, exc=TypeError)
        if isinstance(self.hooks, tuple) and not self.hooks:
            invalid("hooks", "ExtractConfig", f"a non-empty list from {list(HOOK_POINTS)}", list(self.hooks))
        check_choices(self)
        if self.layers is not None and not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
            invalid("layers", "ExtractConfig", "null or a list of block indices", self.layers, exc=TypeError)
        if self.batch_tokens is not None and (not isinstance(self.batch_tokens, int) or self.batch_tokens < 1):
            invalid("batch_tokens", "ExtractConfig", "a positive int or null", self.batch_tokens)


@dataclass(frozen=True, kw_only=True)
class GeometryConfig(ConfigDict):
    """Reference persona and centering set.

    ``centering`` is null (center on the analysed personas), a list of persona names, or a
    persona file whose personas are extracted too and only used for centering.
    """

    reference: str = setting("helpful_assistant", help="the reference persona (cosine 1 by construction)")
    centering: tuple[str, ...] | str | None = setting(None, help="centering set: persona names or a persona file", shown="the analysed personas")
    hook: str = setting("resid_post", choices=HOOK_POINTS, help="hook point of the geometry")

    def __post_init__(self) -> None:
        check_choices(self)
        c = self.centering
        if not (c is None or isinstance(c, str) or (isinstance(c, tuple) and all(isinstance(x, str) for x in c))):
            invalid("centering", "GeometryConfig", "null, a list of persona names or a persona file", c, exc=TypeError)


@dataclass(frozen=True, kw_only=True)
class MarkerConfig(ConfigDict):
    """Which personas get a marker adapter (``"all"`` or a list), and the training seeds."""

    sources: tuple[str, ...] | str = setting("all", help="source personas that get a marker adapter ('all' or names)")
    seeds: tuple[int, ...] = setting((42,), help="training seeds; one adapter per source and seed")

    def __post_init__(self) -> None:
        if isinstance(self.sources, str) and self.sources != "all":
            invalid("sources", "MarkerConfig", "'all' or a list of persona names", self.sources)
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            invalid("seeds", "MarkerConfig", "a non-empty list of non-negative ints", self.seeds)


# How each source's marker dataset is built: the training package's recipe, used as it is.
DataConfig = MarkerDataRecipe


@dataclass(frozen=True, kw_only=True)
class ResponsesConfig(SamplingSettings):
    """Sampling for the base model's answers to the training questions (marker data)."""

    n_completions: int = setting(1, choices=(1,), help="one answer per persona and training question")
    backend: str | None = setting(None, choices=BACKENDS, help="sampling back end", shown="the eval back end")
    tensor_parallel_size: int = setting(1, help="vLLM: GPUs one engine spans, for a model larger than one GPU")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite_temperature(self, "ResponsesConfig")
        check_choices(self)
        check_positive_int(self.tensor_parallel_size, "tensor_parallel_size", "ResponsesConfig")
        if self.tensor_parallel_size > 1 and self.backend == "hf":
            invalid("tensor_parallel_size", "ResponsesConfig", "1 with the hf back end (tensor parallelism is vLLM's)", self.tensor_parallel_size)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(SamplingSettings):
    """Source-rate evaluation: back end, sampling (``SamplingSettings``'s fields) and the marker match."""

    backend: str = setting("vllm", choices=BACKENDS, help="sampling back end")
    regex: bool = setting(False, help="treat the marker as a regular expression")
    batch_size: int | None = setting(
        None, help="sequences per batch on the hf back end (completions do not depend on it)", shown="sized to GPU memory"
    )
    tensor_parallel_size: int = setting(1, help="vLLM: GPUs one engine spans, for a model larger than one GPU")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite_temperature(self, "EvalConfig")
        _check_bools(self, "EvalConfig")
        check_choices(self)
        if self.batch_size is not None:
            check_positive_int(self.batch_size, "batch_size", "EvalConfig")
        check_positive_int(self.tensor_parallel_size, "tensor_parallel_size", "EvalConfig")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            invalid("tensor_parallel_size", "EvalConfig", "1 with the hf back end (tensor parallelism is vLLM's)", self.tensor_parallel_size)

    def sampling(self) -> SamplingSettings:
        """Returns the ``SamplingSettings`` these values describe."""
        return SamplingSettings(**{f.name: getattr(self, f.name) for f in fields(SamplingSettings)})


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig(ConfigDict):
    """Layer sweep and robustness options."""

    primary_layer: int | None = setting(None, help="layer declared in advance, reported as the primary result", shown="none")
    # Robustness layer: the primary layer, else the sweep's best.
    layer: int | None = setting(None, help="layer of the robustness statistics", shown="the primary layer, else the sweep's best")
    holdout: tuple[str, ...] = setting((), help="personas held out of the fit and predicted", metavar="NAME,NAME")
    covariate: str | None = setting("log_n_tokens", choices=("log_n_tokens", None), help="covariate of the partial Spearman (null: none)")
    exclude_reference: bool = setting(False, help="drop the reference persona from every fit")
    n_permutations: int = setting(10_000, cli="permutations", help="permutations of the max-over-layers test (0 skips it)")
    n_bootstrap: int = setting(2_000, cli="bootstrap", help="bootstrap resamples of the confidence intervals (0 skips them)")
    statistic: str = setting("spearman", choices=STATISTICS, help="statistic that picks the strongest layer")
    seed: int = setting(0, help="seed of the permutations and the bootstrap")

    def __post_init__(self) -> None:
        _check_bools(self, "AnalysisConfig")
        check_choices(self)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            invalid("seed", "AnalysisConfig", "an int ≥ 0", self.seed, exc=ValueError if isinstance(self.seed, int) else TypeError)
        for name in ("primary_layer", "layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                invalid(name, "AnalysisConfig", "null or a block index ≥ 0", value, exc=TypeError if not isinstance(value, int) else ValueError)
        if not all(isinstance(x, str) for x in self.holdout):
            invalid("holdout", "AnalysisConfig", "a list of persona names", self.holdout, exc=TypeError)
        for name in ("n_permutations", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                invalid(name, "AnalysisConfig", "an int ≥ 0", value)


@dataclass(frozen=True, kw_only=True)
class FigureConfig(ConfigDict):
    """How the report writes its figures: formats, static size and scale, heatmap grid layers, plotly.js."""

    formats: tuple[str, ...] = setting(("html",), choices=FIGURE_FORMATS, help="figure formats; static ones need the figures extra and a Chromium", metavar="FMT,FMT")
    width: int | None = setting(None, help="static image width in pixels", shown="the figure's own")
    height: int | None = setting(None, help="static image height in pixels", shown="the figure's own")
    scale: float | int = setting(1.0, help="pixel multiplier of raster images (2 for slides, 3 for print)")
    grid_layers: tuple[int, ...] | None = setting(None, help="layers of the small-multiples heatmap", shown="up to six evenly spaced, the analysis layer among them")
    plotlyjs: str = setting("directory", choices=PLOTLYJS_MODES, help="plotly.js for HTML: one file per folder (offline), inline, or a CDN")

    def __post_init__(self) -> None:
        if isinstance(self.formats, str) or not self.formats:
            invalid("formats", "FigureConfig", f"a non-empty list from {list(FIGURE_FORMATS)}", self.formats)
        check_choices(self)
        for key in ("width", "height"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 16):
                invalid(key, "FigureConfig", "null or an int of at least 16 pixels", v)
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not 0 < self.scale <= 10:
            invalid("scale", "FigureConfig", "a number in (0, 10]", self.scale)
        if self.grid_layers is not None and (not self.grid_layers or any(isinstance(v, bool) or not isinstance(v, int) for v in self.grid_layers)):
            invalid("grid_layers", "FigureConfig", "null or a non-empty list of layer indices", self.grid_layers)

    @property
    def static_formats(self) -> tuple[str, ...]:
        """The formats that need kaleido."""
        return tuple(f for f in self.formats if f != "html")


def _is_path(template: str | None) -> bool:
    # A Jinja template has tags; a file name does not.
    return isinstance(template, str) and "{%" not in template and "{{" not in template


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "extract": ExtractConfig,
    "geometry": GeometryConfig,
    "marker": MarkerConfig,
    "data": DataConfig,
    "responses": ResponsesConfig,
    "train": MarkerTrainConfig,
    "eval": EvalConfig,
    "analysis": AnalysisConfig,
    "figures": FigureConfig,
}


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """A whole study: model, personas and questions, and every stage's options."""

    model: ModelConfig
    name: str = "study"
    out: str = "runs/study"
    personas: str = "builtin"
    questions: str = "builtin"
    training_questions: str = "builtin"
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    marker: MarkerConfig = field(default_factory=MarkerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    train: MarkerTrainConfig = field(default_factory=MarkerTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    figures: FigureConfig = field(default_factory=FigureConfig)

    def __post_init__(self) -> None:
        for key in ("name", "out", "personas", "questions", "training_questions"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                invalid(key, "StudyConfig", "a non-empty string", value)
        if self.train.dtype is None and self.model.dtype not in TRAIN_DTYPES:
            invalid("train.dtype", "StudyConfig", f"one of {list(TRAIN_DTYPES)} when model.dtype is {self.model.dtype!r}", None)
        if self.geometry.hook not in self.extract.hooks:
            invalid("geometry.hook", "StudyConfig", f"one of the extracted hooks {list(self.extract.hooks)}", self.geometry.hook)
        from persona_geometry.marker import MarkerMatcher

        try:  # the pattern the eval stage will match, compiled now rather than after training
            MarkerMatcher(marker=self.data.marker, regex=self.eval.regex)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data.marker (with eval.regex: {self.eval.regex}): {e}") from e

    def train_dtype(self) -> str:
        """Returns the dtype training runs at: ``train.dtype`` when set, else ``model.dtype`` (one policy)."""
        return self.train.dtype if self.train.dtype is not None else self.model.dtype

    # Loading ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None) -> StudyConfig:
        """Returns a validated config; relative file paths are resolved against ``base_dir``.

        Raises:
            ValueError: On an unknown key or a bad value; the message names the key.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"A study config must be a mapping of sections. Got {type(data).__name__} instead.")
        if "model" not in data:
            raise ValueError("The study config needs a 'model' section with at least 'name'.")
        data = dict(data)
        if isinstance(data["model"], str):
            data["model"] = {"name": data["model"]}
        kwargs: dict[str, Any] = {}
        allowed = [f.name for f in fields(cls)]
        for key, value in data.items():
            if key not in allowed:
                raise ValueError(f"Unknown key '{key}' in the study config. Allowed keys: {allowed}.")
            if key in _SECTIONS:
                kwargs[key] = _build_section(_SECTIONS[key], value, key)
            else:
                kwargs[key] = value
        base = Path(base_dir) if base_dir is not None else None
        # Input files resolve against the config's folder; `out` stays relative to the working directory.
        for key in ("personas", "questions", "training_questions"):
            value = kwargs.get(key)
            if base is not None and isinstance(value, str) and value != "builtin" and not os.path.isabs(value):
                kwargs[key] = str(base / value)
        if base is not None:
            template = kwargs["model"].chat_template
            if _is_path(template) and not os.path.isabs(template):
                kwargs["model"] = dataclasses.replace(kwargs["model"], chat_template=str(base / template))
            centering = kwargs["geometry"].centering if "geometry" in kwargs else None
            if isinstance(centering, str) and not os.path.isabs(centering):
                kwargs["geometry"] = dataclasses.replace(kwargs["geometry"], centering=str(base / centering))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"study config: {e}") from e

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StudyConfig:
        """Returns the config in a YAML (or JSON) file; relative input paths resolve against its folder.

        Raises:
            ValueError: If the file is missing or malformed, or holds an unknown key or bad value.
        """
        from persona_geometry._serialization import parse_structured, read_text_file

        path = Path(path)
        if not path.is_file():
            invalid("config", "StudyConfig.load", "an existing YAML file", str(path))
        # The loader the persona files use: safe, and a repeated key is an error, not "last wins".
        text = read_text_file(path, param="config", func="StudyConfig.load")
        data = parse_structured(text, path, param="config", func="StudyConfig.load")
        if data is not None and not isinstance(data, Mapping):
            invalid("config", "StudyConfig.load", "a YAML mapping of sections (model, extract, ...)", f"{path} holding a {type(data).__name__}")
        try:
            return cls.from_dict(data if data is not None else {}, base_dir=path.parent)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Returns the resolved config as a JSON/YAML-safe dict (every default filled in)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, ConfigDict) else value
        return out

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """Returns a copy with top-level fields replaced (e.g. ``out=...``)."""
        return dataclasses.replace(self, **changes)


def _build_section(cls: type, value: Any, path: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise ValueError(f"The study config's '{path}' section must be a mapping. Got {value!r} instead.")
    names = {f.name for f in fields(cls)}
    for key in value:
        if key not in names:
            raise ValueError(f"Unknown key '{path}.{key}' in the study config. Allowed keys of '{path}': {sorted(names)}.")
    _check_lists(cls, value, path)
    try:
        return cls(**coerce_fields(cls, value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"Bad value in the study config's '{path}' section: {e}") from e


def _check_lists(cls: type, value: Mapping[str, Any], path: str) -> None:
    """Refuses a scalar where a list is wanted (``hooks: resid_post``), rather than reading its letters."""
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for key, v in value.items():
        hint = hints.get(key)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = typing.get_args(hint) if union else (hint,)
        if not any(typing.get_origin(a) is tuple for a in args) or v is None or isinstance(v, list | tuple):
            continue
        if not any(a is type(v) for a in args):
            also = " or a string" if str in args else ""
            raise ValueError(f"Bad value in the study config's '{path}' section: '{key}' ({path}.{key}) must be a list{also}, e.g. [{v!r}]. Got {v!r} instead.")
