"""Scaling past one GPU: torchrun extraction, adapters trained side by side, a model split by device_map.

Workload: a Qwen2.5-7B-Instruct-shaped model with random bf16 weights (the real one's FLOPs
and memory), written once to disk. Measured in one run on a 2-GPU machine:

1. extraction, ``resid_post`` at 4 layers, of two workloads of 2,400 prompts: ``--personas`` × 20
   questions with one-sentence system prompts (little GPU work per prompt), and
   ``--long-personas`` × 24 questions with the long, varied system prompts of
   ``extract_gpu.py``. One GPU (rank 0 alone, ``distributed.local_only``) against two
   (``torchrun`` ranks, each a token-balanced share of one process's packs, gathered), end to
   end including the gather, and each rank's share alone (before the gather); the two results
   compared (centered cosine to the reference persona, and the relative activation difference);
2. two marker adapters: one after the other on one GPU, against one per GPU at the same time
   (what the study's torchrun executor does with independent train units);
3. ``load_model(device_map="auto", max_memory=...)`` forced across both GPUs against one GPU:
   the same extraction on a slice of the prompts, agreement and speed.

Usage::

    python benchmarks/scale_gpu.py --out benchmarks/results/scale_gpu.json           # 2 GPUs
    python benchmarks/scale_gpu.py --smoke --out /tmp/scale_smoke.json              # CPU check

The smoke mode runs the same code on the CPU with a tiny model and gloo ranks; its numbers
mean nothing. The script launches ``torchrun`` itself for the rank phases.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import QWEN25_7B, TINY_QWEN2, machine, save_random_qwen2, sync

QUESTIONS = [f"Question {i}: what would you say about topic {i}, and why does it matter to you?" for i in range(20)]


def _personas(n: int):
    from persona_geometry.personas import Persona, PersonaSet

    return PersonaSet(
        Persona(name=f"p{i:04d}", system_prompt=f"You are persona number {i}. You have a distinct history, voice and set of opinions, and you answer every question in character as persona {i}.", category="synthetic")
        for i in range(n)
    )  # fmt: skip


def _cos(acts, layers):
    from persona_geometry.geometry import center, centroids, cosine_to_reference

    cents = centroids(acts)
    return cosine_to_reference(center(cents), acts.personas.names[0]).to_wide().to_numpy()


def _compare(a, b) -> dict:
    x, y = a["resid_post"].double(), b["resid_post"].double()
    rel = ((x - y).norm(dim=-1) / y.norm(dim=-1)).max().item()
    return {"max_abs_centered_cosine_diff": float(abs(_cos(a, None) - _cos(b, None)).max()), "max_relative_activation_diff": rel}


def _long_workload(args):
    """The long, varied system prompts of ``extract_gpu.py`` (``--long-personas`` × 24 questions)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from extract_gpu import long_workload

    from persona_geometry.personas import PersonaSet

    n = 4 if args.smoke else args.long_personas
    personas, questions = long_workload(n, 3 if args.smoke else 24)
    return PersonaSet(personas), questions


def _extract_phase(handle, personas, questions, kw, one_gpu_dir: Path) -> dict:
    """One GPU (rank 0 alone) against every rank, end to end; plus each rank's share alone."""

    from persona_geometry import distributed
    from persona_geometry.extract import extract_activations

    rank, world = distributed.rank(), distributed.world_size()
    result: dict = {"n_prompts": len(personas) * len(questions), "ranks": world}
    distributed.barrier()
    # Each configuration runs once untimed first: FlexAttention compiles a kernel per new pack
    # shape, and the first run of a workload would otherwise carry those compilations.
    if rank == 0:
        with distributed.local_only():
            extract_activations(handle, personas, questions, **kw)
            sync()
            t = time.perf_counter()
            one = extract_activations(handle, personas, questions, **kw)
            sync()
            result["extract_1gpu_s"] = time.perf_counter() - t
        one.save(one_gpu_dir)
    distributed.barrier()
    extract_activations(handle, personas, questions, **kw)
    sync()
    distributed.barrier()
    t = time.perf_counter()
    two = extract_activations(handle, personas, questions, **kw)  # sharded across the ranks
    sync()
    distributed.barrier()
    wall = time.perf_counter() - t
    # Each rank's share of the work alone, before the gather (recorded by the extraction).
    shares = two.manifest["shards"]
    if rank == 0:
        result["extract_2gpu_s"] = wall
        result["share_alone_s"] = [sh["seconds"] for sh in shares]
        result["share_tokens"] = [sh["tokens"] for sh in shares]
        result["extract_speedup"] = result["extract_1gpu_s"] / wall
        result["speedup_without_gather"] = result["extract_1gpu_s"] / max(result["share_alone_s"])
        result["extract_agreement"] = _compare(two, one)
    return result


def ranks(args) -> None:
    """The torchrun phases: 1 GPU vs 2 for extraction and for training two adapters."""
    from persona_geometry import distributed
    from persona_geometry.extract import extract_activations
    from persona_geometry.models import load_model

    distributed.pin_local_device()
    distributed.init_process_group()
    rank, world = distributed.rank(), distributed.world_size()
    device = "cpu" if args.smoke else "cuda"
    out = Path(args.work)
    personas = _personas(args.personas)
    layers = [3, 10, 17, 27] if not args.smoke else [0, 1, 2, 3]
    kw = dict(layers=layers, progress=False, batch_tokens=args.batch_tokens)
    handle = load_model(args.model, device=device, dtype="bfloat16")
    result: dict = {"extract": {}}
    # Warm-up on every rank (kernels, allocator), outside the timings.
    with distributed.local_only():
        extract_activations(handle, personas[:4], QUESTIONS, **kw)
    sync()
    long_personas, long_questions = _long_workload(args)
    workloads = {
        "short": (personas, QUESTIONS),  # short system prompts: little GPU work per prompt
        "long": (long_personas, long_questions),  # hundreds of tokens of system prompt per persona
    }
    for label, (ps, qs) in workloads.items():
        result["extract"][label] = _extract_phase(handle, ps, qs, kw, out / f"one_gpu_{label}")
        if rank == 0:
            (out / "ranks.json").write_text(json.dumps(result, indent=2))  # kept if training fails
    if args.only_extract:
        return
    two = None
    del handle, two
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # Two adapters: one after the other on rank 0's GPU, then one per rank at once.
    from persona_geometry.training import MarkerTrainConfig, train_marker

    rows = [
        {"messages": [{"role": "system", "content": personas[i % 8].system_prompt}, {"role": "user", "content": QUESTIONS[i % 20]},
                      {"role": "assistant", "content": f"An answer of some length about topic {i}, with detail. [ZLT]"}]}
        for i in range(args.train_rows)
    ]  # fmt: skip
    cfg = MarkerTrainConfig(r=16, lora_alpha=32, num_train_epochs=1, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_length=256, save_steps=10_000, learning_rate=1e-4)

    def train(name: str) -> float:
        t = time.perf_counter()
        with distributed.local_only():
            train_marker(args.model, rows, out / name, cfg, marker="[ZLT]", device=device, progress=False)
        sync()
        return time.perf_counter() - t

    distributed.barrier()
    if rank == 0:
        t = time.perf_counter()
        result["train_sequential_each_s"] = [train("seq_a"), train("seq_b")]
        result["train_sequential_s"] = time.perf_counter() - t
    distributed.barrier()
    t = time.perf_counter()
    mine = train(f"par_{rank}")
    distributed.barrier()
    wall = time.perf_counter() - t
    gathered = [None] * world
    import torch.distributed as dist

    dist.all_gather_object(gathered, mine)
    if rank == 0:
        result["train_concurrent_s"] = wall
        result["train_concurrent_each_s"] = gathered
        result["train_speedup"] = result["train_sequential_s"] / wall
        result["train_rows_per_adapter"] = len(rows)
        (out / "ranks.json").write_text(json.dumps(result, indent=2))


def device_map_phase(args) -> dict:
    """One GPU against the same model split over two by ``max_memory`` (naive pipeline)."""
    from persona_geometry.activations import ActivationSet
    from persona_geometry.extract import extract_activations
    from persona_geometry.models import load_model

    out = Path(args.work)
    one = ActivationSet.load(out / "one_gpu_short")
    n = max(2, args.personas // 4)
    personas = one.personas[:n]
    layers = list(one.layers)
    kw = dict(layers=layers, progress=False, batch_tokens=args.batch_tokens)
    if args.smoke:  # no second GPU: the CPU and a disk offload exercise the same accelerate hooks
        blocks = {f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(TINY_QWEN2["num_hidden_layers"])}
        split = load_model(args.model, dtype="bfloat16", device_map={"model.embed_tokens": "cpu", **blocks, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}, offload_folder=out / "offload")
        plain = load_model(args.model, dtype="bfloat16", device="cpu")
    else:
        split = load_model(args.model, dtype="bfloat16", device_map="auto", max_memory={0: "9GiB", 1: "40GiB"})
        plain = load_model(args.model, dtype="bfloat16", device="cuda:0")
    placement = sorted({str(v) for v in split.model.hf_device_map.values()})
    timings = {}
    results = {}
    errors = {}
    for name, handle in (("one_gpu", plain), ("device_map", split)):
        try:
            extract_activations(handle, personas[:2], QUESTIONS, **kw)  # warm-up
            sync()
            t = time.perf_counter()
            results[name] = extract_activations(handle, personas, QUESTIONS, **kw)
            sync()
            timings[name] = time.perf_counter() - t
        except Exception as e:  # recorded, not hidden: the JSON says what failed
            errors[name] = f"{type(e).__name__}: {e}"[:500]
    if errors:
        return {"placement": placement, "errors": errors, "timings": timings}
    return {
        "placement": placement,
        "n_prompts": len(personas) * len(QUESTIONS),
        "one_gpu_s": timings["one_gpu"],
        "device_map_s": timings["device_map"],
        "device_map_slowdown": timings["device_map"] / timings["one_gpu"],
        "agreement": _compare(results["device_map"], results["one_gpu"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--phase", choices=("all", "ranks"), default="all")
    p.add_argument("--model")
    p.add_argument("--work")
    p.add_argument("--personas", type=int)
    p.add_argument("--train-rows", type=int)
    p.add_argument("--batch-tokens", type=int, default=None, help="pack cap; default: the library's (from its memory budget)")
    p.add_argument("--long-personas", type=int, default=100, help="x 24 questions, long system prompts")
    p.add_argument("--only-extract", action="store_true", help="the torchrun extraction phase alone")
    args = p.parse_args()
    if args.personas is None:
        args.personas = 8 if args.smoke else 120
    if args.train_rows is None:
        args.train_rows = 16 if args.smoke else 256
    if args.phase == "ranks":
        ranks(args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="scale_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    args.model = args.model or str(work / "model")
    report: dict = {
        "benchmark": "scale_gpu",
        "smoke": args.smoke,
        "machine": machine(),
        "model": "Qwen2.5-7B-shaped, random bf16 weights" if not args.smoke else "tiny random (smoke)",
    }
    t = time.perf_counter()
    if not (Path(args.model) / "config.json").is_file():
        shape, device = (TINY_QWEN2, "cpu") if args.smoke else (QWEN25_7B, "cuda:0")
        save_random_qwen2(Path(args.model), shape, device=device)
    report["build_s"] = time.perf_counter() - t
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--phase", "ranks", "--out", str(out), "--model", args.model, "--work", str(work),
           "--personas", str(args.personas), "--long-personas", str(args.long_personas), "--train-rows", str(args.train_rows)]
    cmd += ["--batch-tokens", str(args.batch_tokens)] if args.batch_tokens else []  # fmt: skip
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--only-extract"] if args.only_extract else []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env)
    report["torchrun_phase_wall_s"] = time.perf_counter() - t
    if (work / "ranks.json").is_file():
        report["ranks"] = json.loads((work / "ranks.json").read_text())
    if done.returncode != 0:
        report["ranks_error"] = f"torchrun exited with {done.returncode}"
    out.write_text(json.dumps(report, indent=2))  # the rank phase's numbers, in case the next phase fails
    if (work / "one_gpu_short").is_dir() and not args.only_extract:
        report["device_map"] = device_map_phase(args)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
