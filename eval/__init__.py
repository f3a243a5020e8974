"""Source-rate evaluation: sample completions with the marker adapter, count the marker per persona.

Two back ends take the same rendered prompts and sampling settings: vLLM (one ``generate`` call,
the adapter applied with a ``LoRARequest``) and Hugging Face (one base model, adapters unmerged,
full batches across adapters).
"""

# The sampling back ends, adapter checks, marker matching and Wilson intervals live in the core
# (training and probes use them too); they are re-exported here where users expect them.
from persona_geometry.adapters import (
    architecture_fingerprint,
    check_adapter_matches,
    read_adapter_info,
)
from persona_geometry.eval.source_rate import (
    PersonaRate,
    SourceRates,
    source_rates,
    source_rates_by_adapter,
)
from persona_geometry.marker import DEFAULT_MARKER, MarkerMatcher
from persona_geometry.sampling import (
    BACKENDS,
    SamplingSettings,
    adapter_rank,
    generate_adapter_completions,
    generate_completions,
    sample_hf,
)
from persona_geometry.stats import wilson_bounds as wilson_interval

__all__ = [
    "BACKENDS",
    "DEFAULT_MARKER",
    "MarkerMatcher",
    "PersonaRate",
    "SamplingSettings",
    "SourceRates",
    "adapter_rank",
    "check_adapter_matches",
    "generate_adapter_completions",
    "generate_completions",
    "architecture_fingerprint",
    "read_adapter_info",
    "sample_hf",
    "source_rates",
    "source_rates_by_adapter",
    "wilson_interval",
]
