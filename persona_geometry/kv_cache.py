"""A key/value cache and an attention path for decoding many rows at once.

Two costs dominate a large-batch decode step in transformers besides the weights themselves:

- ``DynamicCache`` grows by ``torch.cat``: every step copies every layer's whole cache.
  :class:`GrowingCache` writes each step's keys and values into buffers allocated once, at the
  most tokens the batch can reach, and hands the attention a view of the filled part.
- With grouped-query attention and a padding mask, the ``sdpa`` path repeats every key/value head
  for each query head it serves (``repeat_kv``) before calling the kernel: at decode time that
  writes and reads the cache ``heads / kv_heads`` times per step.
  :func:`grouped_decode_attention` attends one query token per row against the unrepeated
  cache with two batched matrix products (query heads grouped by the key/value head they share),
  so each step reads the cache once. Prefill and any call it does not cover go to ``sdpa``.

:func:`decode_attention` switches a model to that attention for the duration of a ``with``
block and reports whether it could: models whose attention does not go through transformers'
attention interface keep their own path.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["GROUPED_DECODE", "GrowingCache", "decode_attention", "grouped_decode_attention"]

log = logging.getLogger(__name__)

# The name under which the attention below is registered with transformers.
GROUPED_DECODE = "persona_geometry_grouped_decode"


def grouped_decode_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention for one new token per row against a grouped key/value cache; else ``sdpa``.

    Shapes follow transformers' attention interface: ``query [batch, heads, q, head_dim]``,
    ``key``/``value [batch, kv_heads, kv, head_dim]``, a boolean (True = attend) or additive
    ``attention_mask [batch, 1, q, kv]`` or None; returns ``[batch, q, heads, head_dim]``.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    unusual = dropout or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks"))
    if q_len != 1 or unusual or heads % kv_heads or key.shape[-1] != value.shape[-1]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )  # fmt: skip
    scale = scaling if scaling is not None else head_dim**-0.5
    grouped = query.view(batch, kv_heads, heads // kv_heads, head_dim) * scale
    scores = torch.matmul(grouped, key.transpose(-1, -2))  # [b, kv_heads, g, kv]
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, -key.shape[-2] :]  # [b, 1, 1, kv]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    # Softmax accumulates in float32 at least, as the fused kernels do.
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    weights = weights.to(value.dtype)
    out = torch.matmul(weights, value)  # [b, kv_heads, g, head_dim]
    return out.reshape(batch, 1, heads, head_dim), None


@contextmanager
def decode_attention(model: Any) -> Iterator[bool]:
    """Runs the block with :func:`grouped_decode_attention`; yields whether the model took it.

    The model's attention implementation is restored on exit. Models that cannot switch their
    attention at run time (no transformers attention interface) yield False and are left as
    they are; so do models on an implementation other than ``sdpa`` or ``eager`` (flash and
    flex kernels already read grouped caches without repeating them).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    can = (
        before in ("sdpa", "eager")
        and hasattr(base, "set_attn_implementation")
        and getattr(base, "_can_set_attn_implementation", lambda: False)()
    )
    if not can:
        yield False
        return
    AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_DECODE, sdpa_mask)
    try:
        base.set_attn_implementation(GROUPED_DECODE)
    except (ValueError, KeyError) as error:  # a transformers release that refuses custom names
        log.debug("grouped decode attention not taken: %s", error)
        yield False
        return
    try:
        yield base.config._attn_implementation == GROUPED_DECODE
    finally:
        base.set_attn_implementation(before)


@functools.cache
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """One layer's keys and values in buffers sized once, viewed up to the filled part."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0
            self._keys = self._values = None

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            import torch

            batch, heads, _, dim = key_states.shape
            self.device = key_states.device
            self._keys = torch.empty(
                batch, heads, self.capacity, dim, dtype=key_states.dtype, device=self.device
            )
            self._values = torch.empty(
                batch, heads, self.capacity, value_states.shape[-1], dtype=value_states.dtype,
                device=self.device,
            )  # fmt: skip
            self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, stop = self.length, self.length + key_states.shape[-2]
            if stop > self.capacity:
                raise ValueError(
                    f"GrowingCache: capacity {self.capacity} tokens exceeded (needs {stop})"
                )
            self._keys[:, :, start:stop].copy_(key_states)
            self._values[:, :, start:stop].copy_(value_states)
            self.length = stop
            self.keys, self.values = self._keys[:, :, :stop], self._values[:, :, :stop]
            return self.keys, self.values

        def batch_select_indices(self, indices: Any) -> None:
            if self._keys is None:
                return
            import torch

            # New buffers as long as before; only the filled part of the kept rows is copied.
            n = self.length
            keys = torch.empty(
                (len(indices), *self._keys.shape[1:]), dtype=self._keys.dtype, device=self.device
            )
            values = torch.empty(
                (len(indices), *self._values.shape[1:]),
                dtype=self._values.dtype,
                device=self.device,
            )
            keys[:, :, :n].copy_(self._keys[:, :, :n].index_select(0, indices))
            values[:, :, :n].copy_(self._values[:, :, :n].index_select(0, indices))
            self._keys, self._values = keys, values
            self.keys, self.values = keys[:, :, :n], values[:, :, :n]

        def get_seq_length(self) -> int:
            return self.length

        def reset(self) -> None:
            self.length = 0
            if self._keys is not None:
                self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]

    return GrowingLayer


def GrowingCache(model: Any, capacity: int) -> Any:  # noqa: N802 - builds a transformers Cache
    """Returns a transformers ``Cache`` whose layers hold up to ``capacity`` tokens per row.

    Each layer allocates its buffers at its first update (batch and heads taken from it), and
    ``batch_select_indices`` (dropping finished rows) copies only the rows kept.
    """
    from transformers.cache_utils import Cache

    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    layer = _growing_layer_class()
    return Cache(layers=[layer(capacity) for _ in range(config.num_hidden_layers)])
