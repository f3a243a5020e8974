"""Model loading: a Hugging Face causal LM, its tokenizer and its identity, in one handle.

``load_model`` takes a local folder or a Hugging Face id, optionally applies a peft (LoRA)
adapter, and returns a frozen ``ModelHandle`` that also carries what the activation store needs
to trust a cache: the model id, the revision (commit) when the model comes from the HF cache,
and otherwise a cheap fingerprint of the weight files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from persona_geometry._validation import invalid
from persona_geometry.adapters import architecture_fields
from persona_geometry.provenance import stable_hash
from persona_geometry.settings import DTYPES

__all__ = ["ModelHandle", "load_model", "model_identity", "resolve_precision"]

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CACHE_SNAPSHOT = re.compile(
    r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})"
)


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """A loaded causal LM with its tokenizer and the identity that provenance records.

    Attributes:
        model: The Hugging Face model (in eval mode, adapter already merged if one was given).
        tokenizer: Its tokenizer.
        model_id: The id or folder the model was loaded from, as the caller gave it.
        revision: The commit hash when the model came from the HF cache, else None.
        dtype: The dtype of the weights.
        device: Where the weights live.
        adapter: The peft adapter folder or id applied, or None.
        weights_id: A stable identity of the weights for manifests and cache keys:
            ``"<model_id>@<commit>"`` for cached hub models, otherwise a hash of the weight
            files' names, sizes, modification times, safetensors headers and sampled bytes;
            an adapter's content hash is appended when one is applied.
        path: The local folder the weights were read from, when there is one.
    """

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    model_id: str
    revision: str | None
    dtype: torch.dtype
    device: torch.device
    adapter: str | None = None
    weights_id: str = ""
    path: Path | None = None

    def provenance(self) -> dict[str, Any]:
        """Returns the JSON-safe identity of the model for a manifest."""
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "weights_id": self.weights_id,
            "adapter": self.adapter,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
        }


def dtype_name(dtype: torch.dtype) -> str:
    """Returns ``"float32"`` for ``torch.float32`` and so on."""
    return str(dtype).removeprefix("torch.")


def resolve_precision(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    func: str = "load_model",
    allowed: Sequence[str] = DTYPES,
) -> tuple[torch.device, torch.dtype]:
    """Returns the ``(device, dtype)`` a stage runs at: the one rule every stage applies.

    Extraction, response generation, training and evaluation all resolve their precision here,
    so a study's stages run at the same dtype on the same device.

    Args:
        device: A torch device; None means ``"cuda"`` when available, else ``"cpu"``.
        dtype: A name from ``allowed`` or a torch dtype; None and ``"auto"`` mean float32 on
            CPU and bfloat16 on a GPU.
        func: The public function asking, for the error message.
        allowed: The dtype names the caller accepts (training takes no float16).

    Raises:
        ValueError: On an unknown device or a dtype outside ``allowed``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"The 'device' parameter of {func} must be a torch device such as 'cpu' or 'cuda:0'. "
            f"Got {device!r} instead."
        ) from e
    if torch_device.type == "cuda" and torch_device.index is None and torch.cuda.is_available():
        # An explicit index: transformers reads a bare "cuda" as cuda:LOCAL_RANK, which does not
        # exist when a launcher shows each rank only its own GPU (distributed.pin_local_device).
        torch_device = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count()
        )
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    if name is None or name == "auto":
        return torch_device, torch.float32 if torch_device.type == "cpu" else torch.bfloat16
    if name not in allowed:
        invalid("dtype", func, f"one of {list(allowed)} or None", dtype)
    return torch_device, getattr(torch, name)


def _first_device(device_map: str | dict[str, Any], max_memory: dict[Any, Any] | None) -> str:
    """Returns where a dispatched model's inputs go: the first accelerator in the map, else the
    CPU."""
    if isinstance(device_map, dict):
        for where in device_map.values():
            if where not in ("cpu", "disk"):
                return f"cuda:{where}" if isinstance(where, int) else str(where)
        return "cpu"
    gpus = [k for k in (max_memory or {}) if isinstance(k, int)]
    return f"cuda:{min(gpus)}" if gpus else ("cuda:0" if torch.cuda.is_available() else "cpu")


def _offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    if any(
        os.environ.get(v, "").strip().lower() in truthy
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with separators is meant as a path.
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _resolve_source(
    name_or_path: str, revision: str | None, *, param: str, func: str
) -> tuple[Path | None, str | None]:
    """Returns ``(local folder, commit)`` for a folder or a hub id; the folder is None when
    online."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            invalid(
                "revision", func, "None for a local folder (revisions name hub commits)", revision
            )
        m = _CACHE_SNAPSHOT.search(str(path.resolve()))
        return path, (m.group("commit") if m else None)
    if _looks_like_path(name_or_path) or path.exists():
        invalid(
            param,
            func,
            "an existing model folder or a Hugging Face id",
            name_or_path,
            exc=FileNotFoundError,
        )
    if not _offline():
        return None, None  # from_pretrained downloads as usual; its commit is read afterwards.
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, RevisionNotFoundError, HFValidationError, ...
        raise FileNotFoundError(
            f"The {param!r} parameter of {func} must be a local folder or a Hugging Face id "
            "present in the "
            f"local cache: HF_HUB_OFFLINE is set, so nothing is downloaded. Got {name_or_path!r}"
            f"{f' at revision {revision!r}' if revision else ''} instead, which is not cached "
            f"(download it with `hf download {name_or_path}` where the hub is reachable)."
        ) from e
    return folder, folder.name


def weights_fingerprint(folder: str | os.PathLike[str], *, include_mtime: bool = True) -> str:
    """Returns a cheap hash identifying the weight files in ``folder`` without reading them all.

    It covers each weight file's name, size and (by default) modification time, the JSON
    header of safetensors files (tensor names, dtypes, shapes, offsets), 64 sampled 4 KiB
    blocks of content, and ``config.json``. Two different fine-tunes of one architecture
    differ in their sampled bytes; a re-saved copy differs in its mtime, which errs towards
    recomputing, never towards reusing.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"))
    )
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns if include_mtime else 0}\0".encode())
        with p.open("rb") as f:
            if p.suffix == ".safetensors" and st.st_size >= 8:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100_000_000)))
            # 64 blocks spread over the file, the last one flush with its end.
            for i in range(64):
                f.seek(max(0, min(st.st_size * i // 63, st.st_size - 4096)))
                h.update(f.read(4096))
    return h.hexdigest()[:16]


# Files that decide how text becomes tokens and how a chat is rendered.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def model_identity(
    name_or_path: str | os.PathLike[str], revision: str | None = None
) -> dict[str, Any]:
    """Returns what identifies a model's numbers without loading it: weights, tokenizer, revision.

    For a local folder: ``weights_fingerprint`` and a hash of the tokenizer and chat-template
    files, so rebuilding the weights or editing ``chat_template.jinja`` changes the identity.
    For a hub id: the commit the local cache resolves ``revision`` to (a snapshot's files never
    change under one commit), or ``None`` when the model is not cached yet.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    folder: Path | None = path if path.is_dir() else None
    commit = None
    if folder is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - an id the hub library rejects: nothing cached to identify
            cached = None
        folder = Path(cached).parent if isinstance(cached, str) else None
    if folder is not None:
        m = _CACHE_SNAPSHOT.search(str(folder.resolve()))
        commit = m.group("commit") if m else None
    if folder is None:
        return {
            "model": name,
            "revision": revision,
            "commit": None,
            "weights": None,
            "tokenizer": None,
        }
    h = hashlib.sha256()
    for fname in _TOKENIZER_FILES:
        f = folder / fname
        if f.is_file():
            h.update(fname.encode() + b"\0" + f.read_bytes() + b"\0")
    return {
        "model": name,
        "revision": revision,
        "commit": commit,
        # A hub snapshot is immutable under its commit; a local folder is fingerprinted.
        "weights": None if commit else weights_fingerprint(folder),
        "tokenizer": h.hexdigest()[:16],
    }


def _file_hash(folder: Path) -> str:
    """Returns a hash of every file in a (small) adapter folder."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _check_adapter_base(
    base: str | None, name_or_path: str, folder: Path | None, model: Any, adapter: str
) -> None:
    """Raises ValueError when the adapter's recorded base model is clearly not this model."""
    if not base:
        return
    mismatch = (
        f"The 'adapter' parameter of load_model must be an adapter trained on {name_or_path!r}. "
        f"Got {adapter!r} instead, whose adapter_config.json names base model {base!r}"
    )
    if base == name_or_path or (
        folder is not None and Path(base).expanduser().resolve() == folder.resolve()
    ):
        return
    base_path = Path(base).expanduser()
    if (base_path / "config.json").is_file():
        import json

        theirs = architecture_fields(json.loads((base_path / "config.json").read_text()))
        ours = architecture_fields(model.config)
        if theirs != ours:
            raise ValueError(f"{mismatch} with a different shape ({theirs} vs {ours}).")
        return
    if _looks_like_path(base):
        return  # A folder that no longer exists: nothing left to compare but the weights' shapes.
    # The base is a hub id. Compare with our id, or with the id our cache folder came from.
    ours_id = name_or_path if not Path(name_or_path).expanduser().exists() else None
    if ours_id is None and folder is not None:
        m = _CACHE_SNAPSHOT.search(str(folder.resolve()))
        ours_id = f"{m.group('org')}/{m.group('name')}" if m else None
    if ours_id is not None and ours_id.lower() != base.lower():
        raise ValueError(f"{mismatch}.")


def _apply_adapter(
    model: Any, adapter: str, name_or_path: str, folder: Path | None
) -> tuple[Any, str]:
    """Returns the model with the peft adapter merged in, and the adapter's content hash."""
    import json

    adapter_folder, _ = _resolve_source(adapter, None, param="adapter", func="load_model")
    if adapter_folder is None:  # Online hub id: let huggingface_hub fetch it.
        from huggingface_hub import snapshot_download

        adapter_folder = Path(snapshot_download(adapter))
    config_file = adapter_folder / "adapter_config.json"
    if not config_file.is_file():
        invalid(
            "adapter",
            "load_model",
            "a peft adapter folder holding adapter_config.json",
            adapter,
            exc=FileNotFoundError,
        )
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    _check_adapter_base(base, name_or_path, folder, model, adapter)
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated is_gradient_checkpointing alias when it wraps a
            # model.
            warnings.filterwarnings(
                "ignore",
                message="`is_gradient_checkpointing` is deprecated",
                category=FutureWarning,
            )
            peft_model = PeftModel.from_pretrained(model, str(adapter_folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(
            "The 'adapter' parameter of load_model must be an adapter whose weights fit "
            f"{name_or_path!r}. "
            f"Got {adapter!r} instead: {e}"
        ) from e
    # Merged so that extraction runs the plain model: no LoRA matmuls per step, and the decoder
    # blocks sit at their usual paths for the hooks.
    return peft_model.merge_and_unload(), _file_hash(adapter_folder)


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> ModelHandle:
    """Returns a handle on a causal LM, its tokenizer and its identity, ready for extraction.

    A local folder is loaded as it is. A Hugging Face id is resolved from the local cache
    when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, and never downloaded then;
    otherwise ``from_pretrained`` behaves as usual. The handle records the commit of a cached
    model; for a folder it records a fingerprint of the weight files instead.

    Args:
        name_or_path: A local model folder or a Hugging Face id such as
        ``"Qwen/Qwen2.5-7B-Instruct"``.
        device: Where to put the weights; defaults to ``"cuda"`` when available, else ``"cpu"``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype; None or ``"auto"``
            is float32 on CPU and bfloat16 on GPU (``resolve_precision``, the rule every stage
            applies).
        revision: A hub branch, tag or commit (hub ids only).
        adapter: A peft (LoRA) adapter folder or id, merged into the weights so that a
            fine-tuned model can be measured. Its recorded base model is checked against this
            model where that is possible.
        trust_remote_code: Run modelling code shipped with the checkpoint. Off unless asked.
        device_map: For a model larger than one device: ``"auto"`` (or ``"balanced"``,
            ``"sequential"``) or a dict of module name to device, ``"cpu"`` or ``"disk"``, handed
            to accelerate's big-model inference. The blocks then run where they sit, one device
            at a time; extraction hooks gather each block's last token to one device. ``device``
            is then where the inputs go (by default, the embedding's device).
        max_memory: With ``device_map``: the most memory per device, e.g. ``{0: "70GiB", 1:
        "70GiB"}``.
        offload_folder: With ``device_map``: where blocks mapped to ``"disk"`` are kept.

    Returns:
        A frozen ``ModelHandle`` with the model in eval mode.

    Raises:
        FileNotFoundError: If the folder does not exist, or the id is not cached while offline.
        ValueError: If the dtype or device is unknown, or the adapter does not fit the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    func = "load_model"
    if not isinstance(name_or_path, str | os.PathLike):
        invalid(
            "name_or_path", func, "a model folder or a Hugging Face id", name_or_path, exc=TypeError
        )
    name_or_path = os.fspath(name_or_path)
    if not isinstance(trust_remote_code, bool):
        invalid("trust_remote_code", func, "a bool", trust_remote_code, exc=TypeError)
    if device_map is None and (max_memory is not None or offload_folder is not None):
        invalid("device_map", func, "set when max_memory or offload_folder is", None)
    if device_map is not None and not isinstance(device_map, str | dict):
        invalid(
            "device_map",
            func,
            "'auto', 'balanced', 'sequential' or a dict of module name to device",
            device_map,
            exc=TypeError,
        )
    if device is None and device_map is not None:
        device = _first_device(device_map, max_memory)
    device, torch_dtype = resolve_precision(device, dtype, func=func)
    folder, commit = _resolve_source(name_or_path, revision, param="name_or_path", func=func)
    source = str(folder) if folder is not None else name_or_path
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "local_files_only": _offline(),
    }
    if folder is None and revision is not None:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        # device_map puts the weights straight onto the device, without a full copy in CPU memory.
        if device_map is None:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, device_map=str(device), **kwargs
            )
        else:
            placed = {
                "max_memory": max_memory,
                "offload_folder": os.fspath(offload_folder) if offload_folder is not None else None,
            }
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, device_map=device_map, **placed, **kwargs
            )
    except OSError as e:
        raise FileNotFoundError(
            "The 'name_or_path' parameter of load_model must be a loadable causal LM (config, "
            "weights, "
            f"tokenizer). Got {name_or_path!r} instead: {e}"
        ) from e
    if folder is None:  # Downloaded or found online: read the commit it resolved to.
        commit = getattr(model.config, "_commit_hash", None)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json", revision=commit or revision)
        folder = Path(cached).parent if isinstance(cached, str) else None
    adapter_name = None
    adapter_hash = None
    if adapter is not None:
        adapter_name = os.fspath(adapter)
        model, adapter_hash = _apply_adapter(model, adapter_name, name_or_path, folder)
    # A dispatched model stays where accelerate put it; its hooks move activations between devices.
    model = (model if device_map is not None else model.to(device)).eval()
    model.requires_grad_(False)
    if commit is not None:
        weights_id = f"{name_or_path}@{commit}"
    elif folder is not None:
        weights_id = f"sha:{weights_fingerprint(folder)}"
    else:  # pragma: no cover - a hub model always lands in the cache
        weights_id = f"{name_or_path}@unknown"
    if adapter_hash is not None:
        weights_id += f"+adapter:{adapter_hash}"
    handle = ModelHandle(
        model=model,
        tokenizer=tokenizer,
        model_id=name_or_path,
        revision=commit,
        dtype=next(model.parameters()).dtype,
        device=device,
        adapter=adapter_name,
        weights_id=weights_id,
        path=folder,
    )
    log.info("loaded %s (%s, %s, %s)", name_or_path, handle.dtype, device, weights_id)
    return handle


def model_fingerprint(model: Any) -> str:
    """Returns a hash of an in-memory model's parameter names, shapes and sampled values.

    Used for models handed over without a folder (a ``TransformerBridge`` the caller built):
    each tensor contributes its name, shape, dtype and up to 64 evenly strided values.
    """
    parts = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].float().cpu().tolist()
            parts.append([name, list(p.shape), str(p.dtype), [round(v, 7) for v in sample]])
    return stable_hash(parts)
