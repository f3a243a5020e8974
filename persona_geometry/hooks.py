"""Hook names, decoder-block discovery, and last-token capture with forward hooks.

One naming scheme everywhere: ``hook_name(l, "resid_post") == "blocks.{l}.hook_resid_post"``
(TransformerLens's). Decoder blocks are found from path templates such as
``"model.layers.{num}"``; a caller with an unusual model passes its own template.

``record_last_token`` registers forward hooks on the blocks that copy only the last input
position into a ``[batch, layer, d_model]`` buffer, so an extraction never holds all-position
activations, and it removes them in a ``finally`` whatever happens in the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from persona_geometry._validation import invalid

__all__ = [
    "LAYER_TEMPLATES",
    "HF_HOOK_POINTS",
    "LastTokenRecorder",
    "find_layers",
    "hook_name",
    "record_last_token",
]

# Where the decoder blocks live, tried in order: Qwen2, Llama, Mistral, Gemma (and most recent
# decoder-only models) use model.layers; GPT-2 transformer.h; multimodal Gemma 3 nests the text
# stack; GPT-NeoX and OPT have their own.
LAYER_TEMPLATES: tuple[str, ...] = (
    "model.layers.{num}",
    "transformer.h.{num}",
    "model.language_model.layers.{num}",
    "gpt_neox.layers.{num}",
    "model.decoder.layers.{num}",
)

# Hook points the forward hooks on whole blocks can give: the block's output and its input.
HF_HOOK_POINTS: tuple[str, ...] = ("resid_post", "resid_pre")


def hook_name(layer: int, point: str = "resid_post") -> str:
    """Returns the TransformerLens hook name of ``point`` in block ``layer``.

    ``hook_name(20)`` is ``"blocks.20.hook_resid_post"``: the output of block 20.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        invalid(
            "layer",
            "hook_name",
            "a non-negative int",
            layer,
            exc=TypeError if not isinstance(layer, int) else ValueError,
        )
    if not isinstance(point, str) or not point or point.startswith("hook_"):
        invalid("point", "hook_name", "a hook point such as 'resid_post' (without 'hook_')", point)
    return f"blocks.{layer}.hook_{point}"


def find_layers(model: nn.Module, template: str | None = None) -> tuple[str, list[nn.Module]]:
    """Returns the decoder-block path template and the blocks, in order.

    Args:
        model: A Hugging Face model (a ``...ForCausalLM`` or its base model), or a peft model
            around one (its blocks are found inside; the template is relative to the inner model).
        template: A path with ``{num}`` where the block index goes, e.g. ``"model.layers.{num}"``;
            by default each of ``LAYER_TEMPLATES`` is tried.

    Raises:
        ValueError: If no template matches a ``ModuleList`` of blocks in the model.
    """
    if template is not None and (
        not isinstance(template, str) or "{num}" not in template or not template.endswith(".{num}")
    ):
        invalid(
            "layer_template",
            "find_layers",
            "a module path ending in '.{num}', e.g. 'model.layers.{num}'",
            template,
        )
    candidates = (template,) if template is not None else LAYER_TEMPLATES
    # A peft model wraps the Hugging Face model: look inside it too.
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and get_base() is not model:
        try:
            return find_layers(get_base(), template)
        except ValueError:
            pass
    for tmpl in candidates:
        prefix = tmpl.removesuffix(".{num}")
        paths = [prefix]
        # Templates are written for the ...ForCausalLM wrapper; a bare base model (a Qwen2Model)
        # holds the same blocks one level up ("layers" rather than "model.layers").
        head, _, rest = prefix.partition(".")
        if rest and getattr(model, "base_model_prefix", None) == head:
            paths.append(rest)
        for path in paths:
            try:
                blocks = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return path + ".{num}", list(blocks)
    invalid(
        "layer_template",
        "find_layers",
        f"a path to the model's decoder blocks (tried {list(candidates)}); pass e.g. "
        f"layer_template='model.layers.{{num}}'",
        template,
    )


class _StopForward(Exception):
    """Raised after the last needed block so the rest of the model (and the unembedding) never
    runs."""


class LastTokenRecorder:
    """Collects the last input position of chosen blocks; made by ``record_last_token``.

    Call ``run(forward, batch_size)`` once per batch: it allocates the ``[batch, layer, d_model]``
    buffers on the model's device, runs ``forward``, and returns the buffers.
    """

    def __init__(self, layers: Sequence[int], points: Sequence[str], *, stop_early: bool):
        self.layers = list(layers)
        self.points = list(points)
        self.stop_early = stop_early
        self._buffers: dict[str, Tensor] = {}
        self._filled = 0
        self._batch_size = 0
        self._dtype = torch.float32
        self._index: Tensor | None = None
        self._on_layer: Callable[[int, dict[str, Tensor]], None] | None = None
        # The last hook to fire in a forward: the last layer's output, or its input if only
        # resid_pre is asked for (then that block need not run at all).
        last = max(self.layers)
        # The point whose hook fires last in each block: its store completes a position.
        self._closing = "resid_post" if "resid_post" in self.points else "resid_pre"
        self._last = (last, self._closing)

    def _store(self, point: str, position: int, layer: int, hidden: Tensor) -> None:
        # copy_ into a preallocated buffer: slicing alone would keep the whole [batch, pos, d_model]
        # tensor of every layer alive until the batch ends.
        buffer = self._buffers.get(point)
        if buffer is None:
            buffer = self._buffers[point] = torch.empty(
                (self._batch_size, len(self.layers), hidden.shape[-1]),
                dtype=self._dtype,
                device=hidden.device,
            )
        # Left-padded batches end every prompt in the last column; a pack gathers by index (moved
        # to the block's device: under a device_map the blocks sit on several).
        if self._index is None:
            last = hidden[:, -1]
        else:
            last = hidden[0].index_select(0, self._index.to(hidden.device, non_blocking=True))
        buffer[:, position].copy_(last)
        self._filled += 1
        if self._on_layer is not None and point == self._closing:
            self._on_layer(position, self._buffers)
        if self.stop_early and (layer, point) == self._last:
            raise _StopForward

    def _post_hook(self, position: int, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._store(
                "resid_post", position, layer, output[0] if isinstance(output, tuple) else output
            )

        return hook

    def _pre_hook(self, position: int, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            self._store("resid_pre", position, layer, args[0] if args else kwargs["hidden_states"])

        return hook

    def run(
        self,
        forward: Callable[[], Any],
        batch_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        index: Tensor | None = None,
        on_layer: Callable[[int, dict[str, Tensor]], None] | None = None,
    ) -> dict[str, Float[Tensor, "batch layer d_model"]]:
        """Returns ``{point: [batch, layer, d_model]}`` captured while ``forward()`` runs.

        The buffers live on the device of the hidden states, in ``dtype`` (float32 by default:
        bfloat16 values upcast exactly). By default each row's last position is kept; with
        ``index`` (a packed forward of one sequence), the positions ``index`` of that sequence,
        ``batch_size == len(index)``. ``on_layer(position, buffers)`` is called as each
        position (an index into ``layers``) is complete in every buffer, while the forward is
        being launched: on a GPU, the work queued by then fills it.
        """
        if index is not None and len(index) != batch_size:
            invalid(
                "index", "LastTokenRecorder.run", f"{batch_size} positions (batch_size)", len(index)
            )
        self._index = index
        self._on_layer = on_layer
        self._buffers = {}
        self._filled = 0
        self._batch_size = batch_size
        self._dtype = dtype
        try:
            forward()
        except _StopForward:
            pass
        expected = len(self.layers) * len(self.points)
        if self._filled != expected:
            raise RuntimeError(
                f"Only {self._filled} of {expected} block hooks fired during the forward pass; the "
                "blocks found "
                "are not the ones the model runs (pass layer_template=...)."
            )
        buffers, self._buffers, self._index, self._on_layer = self._buffers, {}, None, None
        return buffers


@contextmanager
def record_last_token(
    model: nn.Module,
    layers: Sequence[int],
    *,
    points: Sequence[str] = ("resid_post",),
    layer_template: str | None = None,
    stop_early: bool = True,
) -> Iterator[LastTokenRecorder]:
    """Yields a recorder whose forward hooks keep the last input position of each block.

    The hooks copy ``hidden[:, -1]`` (the final token when prompts are left-padded) into a
    ``[batch, layer, d_model]`` buffer; ``resid_post`` is the block's output, ``resid_pre`` its
    input. With ``stop_early`` the forward is cut right after the last requested block, so
    later blocks, the final norm and the unembedding never run. The hooks are removed in a
    ``finally``, also when the forward raises.

    Args:
        model: A Hugging Face model.
        layers: Block indices to record (non-negative, already validated).
        points: Any of ``HF_HOOK_POINTS``.
        layer_template: Overrides the block discovery of ``find_layers``.
        stop_early: Cut the forward after the last requested block.
    """
    for point in points:
        if point not in HF_HOOK_POINTS:
            invalid("points", "record_last_token", f"hook points in {list(HF_HOOK_POINTS)}", point)
    _, blocks = find_layers(model, layer_template)
    recorder = LastTokenRecorder(layers, points, stop_early=stop_early)
    handles = []
    try:
        for position, layer in enumerate(layers):
            if "resid_pre" in points:
                handles.append(
                    blocks[layer].register_forward_pre_hook(
                        recorder._pre_hook(position, layer), with_kwargs=True
                    )
                )
            if "resid_post" in points:
                handles.append(
                    blocks[layer].register_forward_hook(recorder._post_hook(position, layer))
                )
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
