"""The behavioural stages at the reference study's shapes: HF sampling and LoRA training, new path vs the old one.

On one model with random weights in a real shape (bf16 on GPU), in one process:

- sampling: the old HF path (``model.generate`` on left-padded batches of 240, each batch seeded,
  the adapter merged: kept below as ``old_sample_ids``) against the new one
  (``persona_geometry.hf_decode.sample_token_ids``: two unmerged LoRA adapters in shared batches
  sized to memory, per-completion seeds, keys and values written into buffers allocated once and
  read once per step by grouped-query decode attention: ``persona_geometry.kv_cache``), both at
  T=1, top-p 0.95, 512 new tokens. Random weights
  never emit an end token, so every row runs all 512 tokens (an upper bound on real time). Also
  the time per decode step against the memory-bandwidth bound (weights + KV cache read once);
- training: the study's recipe (r=32, alpha=64, rsLoRA, 7 projections, AdamW, 16 examples per
  optimiser step) through ``persona_geometry.training.lora._make_trainer``, padded 4 × 4 (the old
  path) against padding-free packing (4 × 4 and 16 × 1), on examples of 100-572 tokens (60 prompt
  tokens masked); model-FLOPs utilisation counts forward (2N) and input gradient (2N) per token
  plus attention, over the dense bf16 peak;
- the whole reference study on the HF back end, extrapolated from those per-unit times.

Usage (GPU):  python benchmarks/study_gpu.py --out benchmarks/results/behaviour_gpu.json
Smoke (CPU):  python benchmarks/study_gpu.py --smoke --out /tmp/behaviour_smoke.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

from harness import QWEN25_7B, TINY_QWEN2, peak_gib, random_qwen2, sync

log = logging.getLogger("study_gpu")

SHAPES = {"qwen2.5-7b": QWEN25_7B, "tiny": TINY_QWEN2}
# The reference study (examples/study_qwen7b.yaml): 12 personas, 200 training questions, 20 probe
# questions x 5 completions, one adapter per persona, 600 rows x 3 epochs per adapter.
STUDY = dict(personas=12, training_questions=200, questions=20, completions=5, adapters=12, train_samples=600 * 3, new_tokens=512)
# Loading the 7B base per training unit from the page cache (README: 15 GB at ~6 GB/s).
BASE_LOAD_SECONDS = 2.5
H200_BANDWIDTH = 4.8e12  # HBM3e, bytes/s
H200_BF16_DENSE = 989e12  # FLOP/s


def build_model(shape: dict, device, dtype):
    model = random_qwen2(shape, device=device, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def _prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1)
    # Lengths differ a little, as personas' system prompts do, so padding is exercised.
    return [torch.randint(3, vocab, (length - (i % 7),), generator=g).tolist() for i in range(n)]


# --- the old HF sampling path, kept here for the comparison --------------------------------------
def old_sample_ids(model, prompt_ids, *, n_completions, max_new_tokens, seed, batch_size, pad_id, min_new_tokens):
    """The HF sampler before this change: ``generate`` per left-padded batch, one seed per batch."""
    import torch

    from persona_geometry.prompts import left_pad
    from persona_geometry.provenance import stable_seed

    device = next(model.parameters()).device
    per_batch = max(1, batch_size // n_completions)
    out = []
    for start in range(0, len(prompt_ids), per_batch):
        chunk = prompt_ids[start : start + per_batch]
        ids, mask = left_pad(chunk, pad_id)
        torch.manual_seed(stable_seed(seed, "hf-batch", start, per_batch))
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens, pad_token_id=pad_id, eos_token_id=None, num_return_sequences=n_completions,
                do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
            )
        rows = generated[:, ids.shape[1] :].cpu().tolist()
        out.extend(rows[i * n_completions : (i + 1) * n_completions] for i in range(len(chunk)))
    return out


def bench_old_sampling(model, *, vocab: int, rows: int, new_tokens: int, prompt_len: int) -> dict:
    n = 5
    prompts = _prompts(vocab, rows // n, prompt_len)
    old_sample_ids(model, prompts[:2], n_completions=n, max_new_tokens=4, seed=0, batch_size=rows, pad_id=0, min_new_tokens=4)
    sync()
    started = time.perf_counter()
    out = old_sample_ids(model, prompts, n_completions=n, max_new_tokens=new_tokens, seed=0, batch_size=rows, pad_id=0, min_new_tokens=new_tokens)
    sync()
    seconds = time.perf_counter() - started
    tokens = sum(len(c) for p in out for c in p)
    return {"path": "HF generate, merged adapter, batch 240 (old)", "sequences": rows, "batch_sequences": rows, "new_tokens": new_tokens,
            "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _add_adapters(model, names, r: int):
    """Returns a peft model holding random LoRA adapters (B non-zero, so each one changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from persona_geometry.training.lora import LORA_TARGET_MODULES

    config = LoraConfig(r=r, lora_alpha=2 * r, use_rslora=True, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 1e-3)
    return peft_model.eval()


def bench_new_sampling(model, *, vocab: int, adapters: int, prompts_per_adapter: int, new_tokens: int, prompt_len: int, batch_size) -> dict:
    """Returns tokens/s of ``sample_token_ids`` over several unmerged adapters in shared batches."""
    from persona_geometry.hf_decode import auto_batch_size, sample_token_ids

    n = 5
    names = [f"adapter{i}" for i in range(adapters)]
    peft_model = _add_adapters(model, names, r=32)
    prompts = _prompts(vocab, prompts_per_adapter, prompt_len)
    common = dict(n_completions=n, temperature=1.0, top_p=0.95, seed=0, pad_id=0, eos_ids=[], adapters=names, progress=False)
    sample_token_ids(peft_model, prompts[:4], max_new_tokens=4, min_new_tokens=4, batch_size=batch_size, **common)
    rows = adapters * prompts_per_adapter * n
    fit = auto_batch_size(peft_model, max_tokens=prompt_len + new_tokens, n_rows=rows)
    size = batch_size or -(-rows // -(-rows // fit))  # what sample_token_ids picks by itself
    sync()
    started = time.perf_counter()
    out = sample_token_ids(peft_model, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_size=size, **common)
    sync()
    seconds = time.perf_counter() - started
    tokens = sum(len(c) for a in out for p in a for c in p)
    n_batches = -(-rows // size)
    step = seconds / (n_batches * new_tokens)
    # The bandwidth bound of one decode step: every weight once, every cached key and value once.
    cfg = model.config
    item = next(model.parameters()).element_size()
    weights = sum(p.numel() for n_, p in peft_model.named_parameters() if "embed_tokens" not in n_) * item
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * item
    mean_rows = rows / n_batches
    kv = mean_rows * (prompt_len + new_tokens / 2) * kv_per_token
    bound = (weights + kv) / H200_BANDWIDTH
    # At hundreds of rows a step is compute-bound: 2 FLOPs per weight per row.
    compute = 2 * (weights / item) * mean_rows / H200_BF16_DENSE
    peft_model.unload()  # the base model, without LoRA layers, for what follows
    return {
        "path": "hf_decode.sample_token_ids, unmerged adapters in shared batches (new)",
        "adapters": adapters, "sequences": rows, "batch_sequences": size, "batches": n_batches, "new_tokens": new_tokens,
        "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "seconds_per_decode_step": step, "bandwidth_bound_seconds_per_step": bound,
        "bandwidth_bound_fraction": bound / step, "bytes_per_step": {"weights": weights, "kv_cache_mean": kv},
        "compute_bound_seconds_per_step": compute, "roofline_fraction": max(bound, compute) / step,
        "peak_memory_gib": peak_gib(),
    }


def bench_train(model, *, vocab: int, packing: bool, micro: int, accumulation: int, steps: int, warmup: int, device_type: str, bf16: bool, seed_lengths: int = 3) -> dict:
    """Returns samples/s and MFU of the recipe's Trainer over ``steps`` optimiser steps after ``warmup``."""
    import torch
    from peft import get_peft_model
    from transformers import TrainerCallback

    from persona_geometry.training.lora import (
        IGNORE_INDEX,
        MarkerTrainConfig,
        _lora_config,
        _make_trainer,
    )

    config = MarkerTrainConfig(
        max_steps=warmup + steps, save_steps=10**6, logging_steps=1, packing=packing,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
    )
    per_step = micro * accumulation
    g = torch.Generator().manual_seed(seed_lengths)
    lengths = torch.randint(100, 573, (per_step * (warmup + steps),), generator=g).tolist()
    examples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 60 + ids[60:]})
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            stamps.append(time.perf_counter())

    model.train()
    model.config.use_cache = False
    peft_model = get_peft_model(model, _lora_config(config))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _make_trainer(peft_model, examples, config, output_dir=Path(tmp), device_type=device_type, bf16=bf16, pad_id=0,
                                callbacks=[Timer()], progress=False)  # fmt: skip
        trainer.train()
    peft_model.unload()
    model.eval()
    seconds = stamps[-1] - stamps[warmup - 1]
    # The trainer shuffles, but the measured steps hold a fixed set of examples on average:
    # count FLOPs on the mean example.
    cfg = model.config
    n_params = sum(p.numel() for n_, p in model.named_parameters() if "embed_tokens" not in n_)
    mean_len = sum(lengths) / len(lengths)
    attention = 3 * 2 * mean_len**2 * cfg.hidden_size * cfg.num_hidden_layers  # causal QK and AV, forward + backward
    flops = steps * per_step * (4 * n_params * mean_len + attention)
    return {
        "path": f"{'packed' if packing else 'padded'} {micro} x {accumulation}" + ("" if packing else " (old)"),
        "samples_per_optimizer_step": per_step, "measured_steps": steps, "mean_tokens_per_sample": mean_len,
        "seconds": seconds, "samples_per_s": steps * per_step / seconds, "tokens_per_s": steps * per_step * mean_len / seconds,
        "model_flops_per_s": flops / seconds, "mfu": flops / seconds / H200_BF16_DENSE, "peak_memory_gib": peak_gib(),
    }


def copy_bandwidth(device) -> float | None:
    """Returns the measured device-to-device copy bandwidth (bytes read + written per second)."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.empty(2**31, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    started = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync()
    rate = 10 * 2 * a.numel() / (time.perf_counter() - started)
    del a, b
    torch.cuda.empty_cache()
    return rate


def study_estimate(*, base_tokens_per_s: float, adapter_tokens_per_s: float, samples_per_s: float) -> dict:
    """Returns the reference study's minutes per stage on the HF back end, from measured unit rates."""
    data = STUDY["personas"] * STUDY["training_questions"] * STUDY["new_tokens"] / base_tokens_per_s
    train = STUDY["adapters"] * (STUDY["train_samples"] / samples_per_s + BASE_LOAD_SECONDS)
    rows = STUDY["adapters"] * STUDY["personas"] * STUDY["questions"] * STUDY["completions"]
    evaluation = rows * STUDY["new_tokens"] / adapter_tokens_per_s + BASE_LOAD_SECONDS
    stages = {"data": data / 60, "train": train / 60, "eval": evaluation / 60, "extract_sweep_report": 1.0}
    return {"minutes_per_stage": stages, "minutes": sum(stages.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, few tokens: checks the script runs (CPU)")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompts-per-adapter", type=int, default=120, help="x 5 completions per adapter")
    parser.add_argument("--old-rows", type=int, default=240)
    parser.add_argument("--skip-old-sampling", action="store_true")
    parser.add_argument("--training-from", default=None, help="take the training section from this earlier results JSON instead of training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import peft
    import torch
    import transformers

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape_name = "tiny" if args.smoke else "qwen2.5-7b"
    shape = SHAPES[shape_name]
    new_tokens = 8 if args.smoke else args.new_tokens
    prompts_per_adapter = 6 if args.smoke else args.prompts_per_adapter
    old_rows = 20 if args.smoke else args.old_rows
    train_steps, train_warmup = (2, 1) if args.smoke else (6, 2)
    result: dict = {
        "benchmark": "benchmarks/study_gpu.py",
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "smoke": args.smoke,
        "shape": shape_name,
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version()},
        "note": "random weights: no row ever stops early, so sampling times are upper bounds for real models",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every measurement, so a run cut short keeps what it measured
        out.write_text(json.dumps(result, indent=2) + "\n")

    started = time.perf_counter()
    model = build_model(shape, device, dtype)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["build_seconds"] = time.perf_counter() - started
    result["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)
    save()

    train: dict = {}
    configs = [("old", False, 4, 4), ("packed_4x4", True, 4, 4), ("packed_16x1", True, 16, 1)]
    if args.training_from:
        earlier = json.loads(Path(args.training_from).read_text())
        train = earlier["training"]
        result["training_from"] = {"file": args.training_from, "machine": earlier["machine"], "note": "training measured in an earlier run"}
        configs = []
    for key, packing, micro, acc in configs:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        log.info("training: %s", key)
        train[key] = bench_train(model, vocab=shape["vocab_size"], packing=packing, micro=micro, accumulation=acc, steps=train_steps,
                                 warmup=train_warmup, device_type=device.type, bf16=dtype == torch.bfloat16)  # fmt: skip
        log.info("%s", train[key])
        result["training"] = train
        save()
    result["training"] = train
    best = max((v for k, v in train.items() if k != "old"), key=lambda v: v["samples_per_s"])
    result.update(training_samples_per_s=best["samples_per_s"], training_path=best["path"],
                  training_speedup=best["samples_per_s"] / train["old"]["samples_per_s"], training_mfu=best["mfu"])  # fmt: skip
    save()

    sampling: dict = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    log.info("sampling: new path")
    sampling["new"] = bench_new_sampling(model, vocab=shape["vocab_size"], adapters=2, prompts_per_adapter=prompts_per_adapter,
                                         new_tokens=new_tokens, prompt_len=60, batch_size=None if device.type == "cuda" else 32)  # fmt: skip
    log.info("%s", sampling["new"])
    result["sampling"] = sampling
    result.update(sampling_tokens_per_s=sampling["new"]["tokens_per_s"], sampling_bandwidth_fraction=sampling["new"]["bandwidth_bound_fraction"], sampling_roofline_fraction=sampling["new"]["roofline_fraction"])
    save()
    if not args.skip_old_sampling:
        log.info("sampling: old path")
        sampling["old"] = bench_old_sampling(model, vocab=shape["vocab_size"], rows=old_rows, new_tokens=new_tokens, prompt_len=60)
        log.info("%s", sampling["old"])
        result["sampling_speedup"] = sampling["new"]["tokens_per_s"] / sampling["old"]["tokens_per_s"]
        save()

    estimate = study_estimate(base_tokens_per_s=sampling["new"]["tokens_per_s"], adapter_tokens_per_s=sampling["new"]["tokens_per_s"],
                              samples_per_s=result["training_samples_per_s"])  # fmt: skip
    result["study"] = {**estimate, "recipe": STUDY, "base_load_seconds_assumed": BASE_LOAD_SECONDS,
                       "note": "data and eval at the mixed-adapter sampling rate (the base model alone is no slower); "
                               "extraction, sweep and report rounded up to one minute"}  # fmt: skip
    result["study_minutes_estimate"] = estimate["minutes"]
    if "old" in sampling:
        old = study_estimate(base_tokens_per_s=sampling["old"]["tokens_per_s"], adapter_tokens_per_s=sampling["old"]["tokens_per_s"],
                             samples_per_s=train["old"]["samples_per_s"])  # fmt: skip
        result["study"]["old_path_minutes"] = old["minutes"]
    result["seconds_total"] = time.perf_counter() - started
    save()
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
