"""persona-geometry: where personas sit in a chat model's representation space, per layer.

Layer ``l`` everywhere in this package is the output of transformer block ``l``
(``blocks.{l}.hook_resid_post`` in TransformerLens naming; ``hidden_states[l + 1]`` in Hugging
Face, except HF's last entry, which has the final norm applied and is never used).
"""

from persona_geometry.activations import HOOK_POINTS, ActivationSet
from persona_geometry.eval import SourceRates, source_rates
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
from persona_geometry.sweep import LayerSweep, layer_sweep
from persona_geometry.training import (
    MarkerDataConfig,
    MarkerTrainConfig,
    build_marker_dataset,
    generate_responses,
    train_marker,
)

__version__ = "0.1.0"

__all__ = [
    "HOOK_POINTS",
    "ActivationSet",
    "Centering",
    "Centroids",
    "CosineToReference",
    "LayerSweep",
    "MarkerDataConfig",
    "MarkerTrainConfig",
    "ModelHandle",
    "PairwiseCosine",
    "Persona",
    "PersonaSet",
    "PromptSet",
    "SourceRates",
    "build_marker_dataset",
    "builtin_personas",
    "builtin_questions",
    "center",
    "centroids",
    "cosine_to_reference",
    "extract_activations",
    "generate_responses",
    "hook_name",
    "layer_sweep",
    "load_model",
    "load_questions",
    "pairwise_cosine",
    "render_prompts",
    "source_rates",
    "train_marker",
    "training_questions",
]
