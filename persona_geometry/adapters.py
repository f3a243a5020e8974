"""What a marker adapter folder holds, and whether it fits a base model — checked cheaply.

These checks read only small JSON files and the safetensors header, so a mismatch is reported
before any model is loaded or any completion is sampled.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from persona_geometry._validation import invalid
from persona_geometry.provenance import stable_hash

__all__ = [
    "ADAPTER_INFO_FILE",
    "ARCHITECTURE_KEYS",
    "architecture_fields",
    "architecture_fingerprint",
    "read_adapter_info",
    "check_adapter_matches",
]

# Written by persona_geometry.training next to peft's adapter_config.json.
ADAPTER_INFO_FILE = "persona_geometry_adapter.json"

# The config fields that make two models "the same architecture" for an adapter: the one
# definition, used by load_model's adapter check and by the fingerprint stored with each adapter.
ARCHITECTURE_KEYS: tuple[str, ...] = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def architecture_fields(config: Any) -> dict[str, Any]:
    """Returns the ``ARCHITECTURE_KEYS`` of a model config (a transformers config or a
    ``config.json`` dict).

    For a multimodal config the text model's fields are read, falling back to the top level.
    """
    if isinstance(config, Mapping):
        text = config.get("text_config") or {}
        return {key: text.get(key, config.get(key)) for key in ARCHITECTURE_KEYS}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {key: getattr(text_config, key, getattr(config, key, None)) for key in ARCHITECTURE_KEYS}


def architecture_fingerprint(model: str | os.PathLike[str]) -> dict[str, Any]:
    """Returns the base model's architecture fields and their stable hash, from its config only."""
    from transformers import AutoConfig

    fields = architecture_fields(AutoConfig.from_pretrained(str(model)))
    return {"fields": fields, "hash": stable_hash(fields)}


def read_adapter_info(
    adapter: str | os.PathLike[str], *, func: str = "read_adapter_info"
) -> dict[str, Any]:
    """Returns what persona-geometry recorded about an adapter (source, marker, base), or ``{}``.

    Raises:
        ValueError: If ``adapter`` is not a folder holding a peft adapter.
    """
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        invalid(
            "adapter", func, "a folder holding a peft adapter (adapter_config.json)", str(adapter)
        )
    info_path = path / ADAPTER_INFO_FILE
    return json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}


def check_adapter_matches(
    model: str | os.PathLike[str], adapter: str | os.PathLike[str], *, func: str
) -> None:
    """Raises ``ValueError`` if the adapter was not trained on a model shaped like ``model``.

    Two checks: the architecture fingerprint persona-geometry stored at training time (when the
    adapter has one), and the LoRA matrices' shapes against the model config's sizes (always).
    """
    info = read_adapter_info(adapter, func=func)
    current = architecture_fingerprint(model)
    stored = info.get("base_fingerprint")
    if stored is not None and stored.get("hash") != current["hash"]:
        differing = {
            k: (stored["fields"].get(k), current["fields"].get(k))
            for k in current["fields"]
            if stored["fields"].get(k) != current["fields"].get(k)
        }
        raise ValueError(
            f"The 'adapter' parameter of {func} must be an adapter trained on this model's "
            "architecture. "
            f"Got {str(adapter)!r}, trained on {info.get('base_model')!r}; differing config fields "
            f"(adapter's base, this model): {differing}."
        )
    _check_lora_shapes(adapter, current["fields"], func=func)


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _check_lora_shapes(
    adapter: str | os.PathLike[str], fields: dict[str, Any], *, func: str
) -> None:
    from safetensors import safe_open

    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        invalid("adapter", func, "a folder with adapter_model.safetensors", str(adapter))
    hidden, inter, n_layers = (
        fields.get("hidden_size"),
        fields.get("intermediate_size"),
        fields.get("num_hidden_layers"),
    )
    # in_features of lora_A per projection: everything but down_proj reads the residual stream.
    expected_in = {
        "q_proj": hidden,
        "k_proj": hidden,
        "v_proj": hidden,
        "gate_proj": hidden,
        "up_proj": hidden,
        "down_proj": inter,
    }
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            layer = _LAYER_RE.search(key)
            if layer and n_layers is not None and int(layer.group(1)) >= n_layers:
                raise ValueError(
                    f"The 'adapter' parameter of {func} must be an adapter for a model with "
                    f"{n_layers} layers. "
                    f"Got {str(adapter)!r}, which has weights for layer {layer.group(1)}."
                )
            if "lora_A" not in key:
                continue
            for proj, size in expected_in.items():
                if f".{proj}." in key and size is not None:
                    got = f.get_slice(key).get_shape()[-1]
                    if got != size:
                        raise ValueError(
                            f"The 'adapter' parameter of {func} must be an adapter whose {proj} "
                            "input size is "
                            f"{size}, as in this model. Got {str(adapter)!r}, whose {proj} input "
                            f"size is {got}: "
                            "it was trained on a different base model."
                        )
