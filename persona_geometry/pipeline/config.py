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

An unknown key or a bad value is one ``ValueError`` naming the key (``train.lr``), raised by
``StudyConfig.from_dict``/``load`` before anything expensive happens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from persona_geometry._serialization import ConfigDict, coerce_fields
from persona_geometry._validation import check_one_of, check_positive_int, invalid
from persona_geometry.activations import HOOK_POINTS
from persona_geometry.sampling import BACKENDS
from persona_geometry.training.lora import MarkerTrainConfig

__all__ = [
    "AnalysisConfig",
    "EvalConfig",
    "ExtractConfig",
    "GeometryConfig",
    "MarkerConfig",
    "ModelConfig",
    "ResponsesConfig",
    "StudyConfig",
    "DataConfig",
]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ConfigDict):
    """Which model to study: a Hugging Face id (from the local cache) or a local folder."""

    name: str
    revision: str | None = None
    dtype: str = "auto"
    device: str | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            invalid("name", "ModelConfig", "a model id or folder", self.name)
        check_one_of(self.dtype, "dtype", "ModelConfig", _DTYPES)
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            invalid("chat_template", "ModelConfig", "null, a Jinja template or a template file", self.chat_template, exc=TypeError)

    def template_text(self) -> str | None:
        """Returns the chat template to use: the file's text when ``chat_template`` is a path.

        Raises:
            ValueError: If ``chat_template`` names a file that does not exist.
        """
        if not _is_path(self.chat_template):
            return self.chat_template
        path = Path(self.chat_template)
        if not path.is_file():
            invalid("chat_template", "ModelConfig", "a Jinja template or an existing template file", str(path))
        return path.read_text(encoding="utf-8")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(ConfigDict):
    """Which activations to cache."""

    hooks: tuple[str, ...] = ("resid_post",)
    layers: tuple[int, ...] | None = None
    engine: str = "hf"
    batch_tokens: int | None = None

    def __post_init__(self) -> None:
        for hook in self.hooks:
            check_one_of(hook, "hooks", "ExtractConfig", HOOK_POINTS)
        check_one_of(self.engine, "engine", "ExtractConfig", ("hf", "transformer_lens"))
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

    reference: str = "helpful_assistant"
    centering: tuple[str, ...] | str | None = None
    hook: str = "resid_post"

    def __post_init__(self) -> None:
        check_one_of(self.hook, "hook", "GeometryConfig", HOOK_POINTS)
        c = self.centering
        if not (c is None or isinstance(c, str) or (isinstance(c, tuple) and all(isinstance(x, str) for x in c))):
            invalid("centering", "GeometryConfig", "null, a list of persona names or a persona file", c, exc=TypeError)


@dataclass(frozen=True, kw_only=True)
class MarkerConfig(ConfigDict):
    """Which personas get a marker adapter (``"all"`` or a list), and the training seeds."""

    sources: tuple[str, ...] | str = "all"
    seeds: tuple[int, ...] = (42,)

    def __post_init__(self) -> None:
        if isinstance(self.sources, str) and self.sources != "all":
            invalid("sources", "MarkerConfig", "'all' or a list of persona names", self.sources)
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            invalid("seeds", "MarkerConfig", "a non-empty list of non-negative ints", self.seeds)


@dataclass(frozen=True, kw_only=True)
class DataConfig(ConfigDict):
    """How each source's marker dataset is built (``MarkerDataConfig`` without the source)."""

    marker: str = "[ZLT]"
    n_source: int = 200
    n_bystander_personas: int = 2
    n_per_bystander: int = 200
    position: str = "end"
    separator: str = "\n\n"
    exclude: tuple[str, ...] = ()

    def for_source(self, source: str) -> Any:
        """Returns the ``MarkerDataConfig`` of one source persona."""
        from persona_geometry.training.data import MarkerDataConfig

        return MarkerDataConfig(source=source, **dataclasses.asdict(self))

    def __post_init__(self) -> None:
        # Validated by MarkerDataConfig itself, with a placeholder source.
        self.for_source("__validation__")


@dataclass(frozen=True, kw_only=True)
class ResponsesConfig(ConfigDict):
    """Sampling for the base model's answers to the training questions (marker data)."""

    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    backend: str | None = None  # None: the eval back end.

    def __post_init__(self) -> None:
        from persona_geometry.sampling import SamplingSettings

        SamplingSettings(n_completions=1, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=self.seed)
        if self.backend is not None:
            check_one_of(self.backend, "backend", "ResponsesConfig", BACKENDS)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(ConfigDict):
    """Source-rate evaluation: back end, sampling and the marker match."""

    backend: str = "vllm"
    n_completions: int = 5
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    regex: bool = False
    batch_size: int | None = None  # HF rows per batch; None sizes batches to memory (results do not depend on it)

    def __post_init__(self) -> None:
        check_one_of(self.backend, "backend", "EvalConfig", BACKENDS)
        if self.batch_size is not None:
            check_positive_int(self.batch_size, "batch_size", "EvalConfig")
        self.sampling()

    def sampling(self) -> Any:
        """Returns the ``SamplingSettings`` these values describe."""
        from persona_geometry.sampling import SamplingSettings

        return SamplingSettings(
            n_completions=self.n_completions,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig(ConfigDict):
    """Layer sweep and robustness options."""

    primary_layer: int | None = None
    layer: int | None = None  # Robustness layer: the primary layer, else the sweep's best.
    holdout: tuple[str, ...] = ()
    covariate: str | None = "log_n_tokens"
    exclude_reference: bool = False
    n_permutations: int = 10_000
    n_bootstrap: int = 2_000
    statistic: str = "spearman"
    seed: int = 0

    def __post_init__(self) -> None:
        check_one_of(self.statistic, "statistic", "AnalysisConfig", ("spearman", "pearson"))
        for name in ("primary_layer", "layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                invalid(name, "AnalysisConfig", "null or a block index ≥ 0", value, exc=TypeError if not isinstance(value, int) else ValueError)
        if not all(isinstance(x, str) for x in self.holdout):
            invalid("holdout", "AnalysisConfig", "a list of persona names", self.holdout, exc=TypeError)
        if self.covariate is not None:
            check_one_of(self.covariate, "covariate", "AnalysisConfig", ("log_n_tokens", None))
        for name in ("n_permutations", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                invalid(name, "AnalysisConfig", "an int ≥ 0", value)


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

    def __post_init__(self) -> None:
        for key in ("name", "out", "personas", "questions", "training_questions"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                invalid(key, "StudyConfig", "a non-empty string", value)

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
        import yaml

        path = Path(path)
        if not path.is_file():
            invalid("config", "StudyConfig.load", "an existing YAML file", str(path))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from e
        return cls.from_dict(data or {}, base_dir=path.parent)

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
    try:
        return cls(**coerce_fields(cls, value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"Bad value in the study config's '{path}' section: {e}") from e
