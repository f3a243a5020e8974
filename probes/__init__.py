"""Activation-level follow-ups on cached activations: directions, projections, probes, steering.

- ``mean_difference`` / ``assistant_axis`` build a ``Direction`` per layer; ``project`` gives
  the coordinate of prompts or centroids along it.
- ``probe_layers`` cross-validates linear probes per layer (folds grouped by question) against a
  shuffled-label baseline; ``LinearProbe`` is the underlying fit/predict/score estimator.
- ``extend`` adds personas or questions to a cached ``ActivationSet`` running only the new
  prompts; ``recenter`` recomputes the centered cosines on another centering set, model-free.
- ``steer`` adds ``strength × direction`` to a block's output during generation;
  ``dose_response`` measures the marker source rate as a function of ``strength``.
"""

from persona_geometry.extend import (
    concat_personas,
    concat_questions,
    extend,
    recenter,
)

from .directions import (
    Direction,
    Projection,
    assistant_axis,
    mean_difference,
    project,
)
from .linear import (
    LinearProbe,
    ProbeConfig,
    ProbeResult,
    probe_layers,
    question_splits,
)
from .steering import DoseResponse, MarkerCounter, dose_response, steer

__all__ = [
    "Direction",
    "DoseResponse",
    "LinearProbe",
    "MarkerCounter",
    "ProbeConfig",
    "ProbeResult",
    "Projection",
    "assistant_axis",
    "concat_personas",
    "concat_questions",
    "dose_response",
    "extend",
    "mean_difference",
    "probe_layers",
    "project",
    "question_splits",
    "recenter",
    "steer",
]
