"""What the benchmark scripts share: model shapes built with random weights, timers, and the
machine record that every results JSON carries.

The scripts run as files (``python benchmarks/x.py``), so this folder is on ``sys.path`` and
they ``import harness``. Heavy imports (torch, transformers) happen inside the functions, so a
script's ``--help`` stays fast.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Real model shapes, as Qwen2Config keyword arguments: random weights in them have the real
# model's FLOPs and memory.
QWEN25_7B: dict[str, Any] = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
QWEN25_05B: dict[str, Any] = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
)  # fmt: skip
# The smoke runs' shape (a script checked on the CPU before GPU time); its numbers mean nothing.
TINY_QWEN2: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip


def cpu_model_specs() -> dict:
    """Returns the CPU benchmarks' models by name: the 4-layer test model and a ~25M one."""
    from persona_geometry.tiny import TinyModelSpec

    return {
        "tiny": TinyModelSpec(),
        "small-25M": TinyModelSpec(
            hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
            intermediate_size=1536,
        ),
    }


def random_qwen2(shape: Mapping[str, Any], *, device, dtype, seed: int = 0, **config: Any):
    """Returns a Qwen2 causal LM of ``shape`` (updated by ``config``) with seeded random weights,
    built directly on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    qwen_config = Qwen2Config(**{**shape, **config})
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            return AutoModelForCausalLM.from_config(qwen_config, dtype=dtype)
        except TypeError:  # transformers before 4.56 calls it torch_dtype
            return AutoModelForCausalLM.from_config(qwen_config, torch_dtype=dtype)


def save_random_qwen2(
    path: Path, shape: Mapping[str, Any], *, device, tokenizer_vocab: int = 4096
) -> None:
    """Writes a random-weight bf16 Qwen2 checkpoint of ``shape`` and a ChatML tokenizer to
    ``path``."""
    import torch

    from persona_geometry.tiny import _train_tokenizer

    _train_tokenizer(tokenizer_vocab).save_pretrained(path)
    model = random_qwen2(shape, device=device, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model


def sync() -> None:
    """Waits for the GPU's queued work, so a timer stops after it (nothing on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    """Returns the peak GPU memory allocated so far, in GiB (None on the CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def best_of(fn: Callable[[], T], repeats: int = 1) -> tuple[float, T]:
    """Returns the best wall time in seconds of ``repeats`` calls of ``fn`` and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def cpu_name() -> str:
    """Returns the CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(note: str | None = None) -> dict[str, Any]:
    """Returns the record of the machine a benchmark ran on, for its results JSON: CPU, cores,
    threads, GPUs, versions and the load average at the call."""
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    record: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": affinity,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1_5_15_min": [round(v, 2) for v in os.getloadavg()],
    }
    if note is not None:
        record["note"] = note
    return record
