"""persona-geometry: where personas sit in a chat model's representation space, per layer.

Layer ``l`` everywhere in this package is the output of transformer block ``l``
(``blocks.{l}.hook_resid_post`` in TransformerLens naming; ``hidden_states[l + 1]`` in Hugging
Face, except HF's last entry, which has the final norm applied and is never used).

The package root re-exports the public API lazily (PEP 562): ``import persona_geometry`` loads
no training, evaluation, analysis or pipeline code, and no vLLM or peft; each name is imported
from the module that defines it the first time it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it. Core names first, then the features above the core.
_EXPORTS: dict[str, str] = {
    "HOOK_POINTS": "persona_geometry.activations",
    "ActivationSet": "persona_geometry.activations",
    "extract_activations": "persona_geometry.extract",
    "Centering": "persona_geometry.geometry",
    "Centroids": "persona_geometry.geometry",
    "CosineToReference": "persona_geometry.geometry",
    "PairwiseCosine": "persona_geometry.geometry",
    "center": "persona_geometry.geometry",
    "centroids": "persona_geometry.geometry",
    "cosine_to_reference": "persona_geometry.geometry",
    "pairwise_cosine": "persona_geometry.geometry",
    "hook_name": "persona_geometry.hooks",
    "ModelHandle": "persona_geometry.models",
    "load_model": "persona_geometry.models",
    "Persona": "persona_geometry.personas",
    "PersonaSet": "persona_geometry.personas",
    "builtin_personas": "persona_geometry.personas",
    "PromptSet": "persona_geometry.prompts",
    "render_prompts": "persona_geometry.prompts",
    "builtin_questions": "persona_geometry.questions",
    "load_questions": "persona_geometry.questions",
    "training_questions": "persona_geometry.questions",
    "LayerSweep": "persona_geometry.analysis.sweep",
    "layer_sweep": "persona_geometry.analysis.sweep",
    "SourceRates": "persona_geometry.eval.source_rate",
    "source_rates": "persona_geometry.eval.source_rate",
    "source_rates_by_adapter": "persona_geometry.eval.source_rate",
    "MarkerDataConfig": "persona_geometry.training.data",
    "build_marker_dataset": "persona_geometry.training.data",
    "generate_responses": "persona_geometry.training.responses",
    "MarkerTrainConfig": "persona_geometry.training.lora",
    "train_marker": "persona_geometry.training.lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'persona_geometry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static type checkers and IDEs see the real names
    from persona_geometry.activations import HOOK_POINTS, ActivationSet
    from persona_geometry.analysis.sweep import LayerSweep, layer_sweep
    from persona_geometry.eval.source_rate import SourceRates, source_rates, source_rates_by_adapter
    from persona_geometry.extract import extract_activations
    from persona_geometry.geometry import (
        Centering,
        Centroids,
        CosineToReference,
        PairwiseCosine,
        center,
        centroids,
        cosine_to_reference,
        pairwise_cosine,
    )
    from persona_geometry.hooks import hook_name
    from persona_geometry.models import ModelHandle, load_model
    from persona_geometry.personas import Persona, PersonaSet, builtin_personas
    from persona_geometry.prompts import PromptSet, render_prompts
    from persona_geometry.questions import builtin_questions, load_questions, training_questions
    from persona_geometry.training.data import MarkerDataConfig, build_marker_dataset
    from persona_geometry.training.lora import MarkerTrainConfig, train_marker
    from persona_geometry.training.responses import generate_responses
