"""Marker training: the base model's responses, marker datasets, and LoRA training on them."""

from persona_geometry.training.data import (
    MarkerDataConfig,
    MarkerDataRecipe,
    MarkerDataset,
    add_marker,
    build_marker_dataset,
    load_marker_dataset,
    make_marker_data,
)
from persona_geometry.training.lora import (
    IGNORE_INDEX,
    LORA_TARGET_MODULES,
    MarkerTrainConfig,
    TrainResult,
    assistant_only_labels,
    train_marker,
)
from persona_geometry.training.responses import generate_responses, load_responses

__all__ = [
    "IGNORE_INDEX",
    "LORA_TARGET_MODULES",
    "MarkerDataConfig",
    "MarkerDataRecipe",
    "MarkerDataset",
    "MarkerTrainConfig",
    "TrainResult",
    "add_marker",
    "assistant_only_labels",
    "build_marker_dataset",
    "generate_responses",
    "load_marker_dataset",
    "load_responses",
    "make_marker_data",
    "train_marker",
]
