"""``ActivationSet``: last-token activations of every ``persona × question`` prompt, per layer.

A thin, labelled wrapper over a dict of tensors, one per hook point, each shaped
``[persona, question, layer, d_model]``. Layer ``l`` is the output of transformer block ``l``
(``blocks.{l}.hook_resid_post``), never Hugging Face's post-final-norm last hidden state.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from persona_geometry._io import atomic_dir, atomic_write_json
from persona_geometry._validation import check_unique_names, invalid
from persona_geometry.personas import PersonaSet
from persona_geometry.settings import HOOK_POINTS

__all__ = [
    "ActivationSet",
    "FORMAT",
    "FORMAT_VERSION",
    "HOOK_POINTS",
    "load_activations",
    "save_activations",
]

# On disk an ActivationSet is a folder with these two files (see ``save_activations``).
FORMAT = "persona-geometry.activations"
FORMAT_VERSION = 1
_TENSORS = "activations.safetensors"
_MANIFEST = "manifest.json"


_HOOK_NAME = re.compile(r"blocks\.(\d+)\.hook_(\w+)")


def _parse_hook_name(key: object) -> tuple[int, str] | None:
    """Returns ``(layer, point)`` of a name ``blocks.{layer}.hook_{point}``, else None."""
    match = _HOOK_NAME.fullmatch(key) if isinstance(key, str) else None
    return (int(match.group(1)), match.group(2)) if match else None


class _MissingHook(KeyError, ValueError):
    """An absent key: a ``KeyError`` (the ``Mapping`` contract) and a ``ValueError`` (bad input)."""

    def __str__(self) -> str:
        return str(self.args[0])


class ActivationSet(Mapping[str, Tensor]):
    """Last-token activations at every requested layer, keyed by hook point.

    ``acts["resid_post"]`` is a ``Float[Tensor, "persona question layer d_model"]``; the
    ``layer`` axis holds the blocks listed in ``acts.layers`` (all blocks by default). It is a
    ``Mapping`` over the stored hook points: ``"resid_pre" in acts`` is False when that hook
    was not captured, ``acts.get("resid_pre")`` is None, and a full TransformerLens name such
    as ``acts["blocks.3.hook_resid_post"]`` gives block 3's ``[persona, question, d_model]``.

    Args:
        activations: Hook name (see ``HOOK_POINTS``) to tensor
            ``[persona, question, layer, d_model]``.
        personas: The personas along the first axis.
        questions: The questions along the second axis.
        layers: The block indices along the third axis.
        n_tokens: Prompt length in tokens, ``[persona, question]``.
        manifest: Provenance (model id and revision, dtype, engine, template and prompt hashes,
            package versions). Stored with the tensors; compared before a cached set is reused.
    """

    def __init__(
        self,
        activations: Mapping[str, Float[Tensor, "persona question layer d_model"]],
        *,
        personas: PersonaSet,
        questions: Sequence[str],
        layers: Sequence[int],
        n_tokens: Int[Tensor, "persona question"],
        manifest: Mapping[str, Any] | None = None,
    ):
        if not activations:
            invalid(
                "activations",
                "ActivationSet",
                "a non-empty mapping of hook name to tensor",
                dict(activations),
            )
        self.personas = personas if isinstance(personas, PersonaSet) else PersonaSet(personas)
        self.questions = tuple(check_unique_names(list(questions), "questions", "ActivationSet"))
        self.layers = tuple(int(layer) for layer in layers)
        self.n_tokens = torch.as_tensor(n_tokens, dtype=torch.long)
        self.manifest = dict(manifest or {})
        expected = (len(self.personas), len(self.questions), len(self.layers))
        self._acts: dict[str, Tensor] = {}
        for hook, tensor in activations.items():
            if hook not in HOOK_POINTS:
                invalid(
                    "activations",
                    "ActivationSet",
                    f"keyed by hook names in {list(HOOK_POINTS)}",
                    hook,
                )
            if tuple(tensor.shape[:3]) != expected or tensor.ndim != 4:
                invalid(
                    "activations",
                    "ActivationSet",
                    f"tensors shaped [persona={expected[0]}, question={expected[1]}, "
                    f"layer={expected[2]}, d_model]",
                    f"{hook}: {tuple(tensor.shape)}",
                )
            self._acts[hook] = tensor
        if tuple(self.n_tokens.shape) != expected[:2]:
            invalid(
                "n_tokens",
                "ActivationSet",
                f"shaped [persona={expected[0]}, question={expected[1]}]",
                tuple(self.n_tokens.shape),
            )

    # Mapping interface -------------------------------------------------------------------------
    def __getitem__(
        self, key: str
    ) -> (
        Float[Tensor, "persona question layer d_model"] | Float[Tensor, "persona question d_model"]
    ):
        """Returns a hook's tensor; a full TransformerLens name gives that block's slice.

        ``acts["resid_post"]`` is ``[persona, question, layer, d_model]``;
        ``acts["blocks.3.hook_resid_post"]`` is ``[persona, question, d_model]`` at block 3.
        An absent key raises ``KeyError`` (so ``in`` and ``get`` behave as for a dict).
        """
        if isinstance(key, str) and key in self._acts:
            return self._acts[key]
        parsed = _parse_hook_name(key)
        if parsed is not None:
            layer, point = parsed
            if point in self._acts and layer in self.layers:
                return self._acts[point][:, :, self.layers.index(layer)]
        raise _MissingHook(
            "The 'hook' parameter of ActivationSet.__getitem__ must be one of the stored hooks "
            f"{list(self._acts)} or a name blocks.<layer>.hook_<point> with a stored layer in "
            f"{list(self.layers)}. Got {key!r} instead."
        )

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._acts.items()}
        model = self.manifest.get("model_id")
        return f"ActivationSet(model={model!r}, hooks={shapes}, dtype={self.dtype})"

    # Labels -------------------------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        """The stored hook points, e.g. ``["resid_post"]``."""
        return list(self._acts)

    @property
    def d_model(self) -> int:
        """The residual stream width."""
        return next(iter(self._acts.values())).shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored tensors."""
        return next(iter(self._acts.values())).dtype

    def layer_position(self, layer: int, *, func: str = "ActivationSet.layer_position") -> int:
        """Returns where block ``layer`` sits on the layer axis (negative counts from the end)."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            invalid(
                "layer", func, f"one of the stored layers {list(self.layers)}", layer, exc=TypeError
            )
        if layer < 0 and -len(self.layers) <= layer:
            return len(self.layers) + layer
        try:
            return self.layers.index(layer)
        except ValueError:
            invalid("layer", func, f"one of the stored layers {list(self.layers)}", layer)

    # Transformations ---------------------------------------------------------------------------
    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> ActivationSet:
        """Returns a copy with every tensor moved to ``device`` and/or cast to ``dtype``."""
        return self._replace({k: v.to(device=device, dtype=dtype) for k, v in self._acts.items()})

    def select(
        self,
        *,
        personas: Sequence[str] | None = None,
        questions: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        hooks: Sequence[str] | None = None,
    ) -> ActivationSet:
        """Returns the subset with these persona names, question positions, layers and hooks."""
        p_idx = (
            [
                self.personas.index(n, param="personas", func="ActivationSet.select")
                for n in personas
            ]
            if personas is not None
            else list(range(len(self.personas)))
        )
        q_idx = list(questions) if questions is not None else list(range(len(self.questions)))
        for q in q_idx:
            if not 0 <= q < len(self.questions):
                invalid(
                    "questions",
                    "ActivationSet.select",
                    f"question positions in [0, {len(self.questions) - 1}]",
                    q,
                )
        l_idx = (
            [self.layer_position(layer, func="ActivationSet.select") for layer in layers]
            if layers is not None
            else list(range(len(self.layers)))
        )
        hooks = list(hooks) if hooks is not None else self.hooks
        acts = {h: self[h][p_idx][:, q_idx][:, :, l_idx] for h in hooks}
        return ActivationSet(
            acts,
            personas=PersonaSet(self.personas[i] for i in p_idx),
            questions=[self.questions[i] for i in q_idx],
            layers=[self.layers[i] for i in l_idx],
            n_tokens=self.n_tokens[p_idx][:, q_idx],
            manifest=self.manifest,
        )

    # Storage ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the set to the folder ``path`` (safetensors + JSON) atomically; returns it."""
        return save_activations(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
    ) -> ActivationSet:
        """Returns the set stored in the folder ``path`` (safetensors and JSON, never pickle)."""
        return load_activations(path, device=device)

    def _replace(self, acts: Mapping[str, Tensor]) -> ActivationSet:
        return ActivationSet(
            acts,
            personas=self.personas,
            questions=self.questions,
            layers=self.layers,
            n_tokens=self.n_tokens,
            manifest=self.manifest,
        )


def save_activations(acts: ActivationSet, path: str | os.PathLike[str]) -> Path:
    """Writes ``acts`` to the folder ``path`` atomically and returns the folder.

    The folder holds ``activations.safetensors`` and ``manifest.json``; an existing folder is
    replaced only once the new one is complete.
    """
    from safetensors.torch import save_file

    tensors = {hook: t.detach().to("cpu").contiguous() for hook, t in acts.items()}
    tensors["n_tokens"] = acts.n_tokens.to("cpu", torch.long).contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "personas": acts.personas.to_list(),
        "questions": list(acts.questions),
        "layers": list(acts.layers),
        "hooks": {
            hook: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for hook, t in acts.items()
        },
        "provenance": json_safe(acts.manifest),
    }
    with atomic_dir(path) as tmp:
        save_file(
            tensors,
            str(tmp / _TENSORS),
            metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
        )
        atomic_write_json(tmp / _MANIFEST, meta)
    return Path(path)


def load_activations(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> ActivationSet:
    """Returns the ``ActivationSet`` stored in the folder ``path`` (safetensors + JSON only).

    Raises:
        FileNotFoundError: If the folder or one of its two files is missing.
        ValueError: If the manifest is not an activation manifest this version can read, or the
            tensors do not match its labels.
    """
    from safetensors.torch import load_file

    path = Path(path)
    for name in (_MANIFEST, _TENSORS):
        if not (path / name).is_file():
            invalid(
                "path",
                "ActivationSet.load",
                f"a folder written by ActivationSet.save (with {_MANIFEST} and {_TENSORS})",
                str(path),
                exc=FileNotFoundError,
            )
    meta = json.loads((path / _MANIFEST).read_text(encoding="utf-8"))
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or meta.get("format_version") != FORMAT_VERSION
    ):
        invalid(
            "path",
            "ActivationSet.load",
            f"a folder in format {FORMAT!r} version {FORMAT_VERSION}",
            str(path),
        )
    tensors = load_file(str(path / _TENSORS), device=str(device))
    hooks = list(meta["hooks"])
    if set(tensors) != {*hooks, "n_tokens"}:
        invalid(
            "path", "ActivationSet.load", f"tensors {sorted({*hooks, 'n_tokens'})}", sorted(tensors)
        )
    return ActivationSet(
        {hook: tensors[hook] for hook in hooks},
        personas=PersonaSet.from_list(meta["personas"]),
        questions=meta["questions"],
        layers=meta["layers"],
        n_tokens=tensors["n_tokens"],
        manifest=meta["provenance"],
    )


def json_safe(obj: Any) -> Any:
    """Returns ``obj`` as plain JSON types (anything else as its ``str``)."""
    return json.loads(json.dumps(obj, default=str))
