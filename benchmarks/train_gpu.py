"""Throughput of marker LoRA training and of HF-back-end sampling, on random weights in real shapes.

Measures, for a Qwen2.5-0.5B-shaped and a Qwen2.5-7B-shaped model (random weights, bf16):

- LoRA training samples/s with the study's recipe (r=32, alpha=64, rsLoRA, q/k/v/o/gate/up/down,
  AdamW, per-device batch 4 x gradient accumulation 4) through the same ``Trainer`` that
  ``persona_geometry.training.train_marker`` builds, on ~300-token examples (60 prompt tokens
  masked, 240 answer tokens supervised);
- HF-back-end sampling tokens/s (temperature 1.0, top_p 0.95, 512 new tokens, left-padded batches)
  through the same sampler ``source_rates(backend="hf")`` uses. Random weights never emit an end
  token, so every sequence runs the full 512 tokens (``min_new_tokens``): the projection to the
  study's evaluation (12 personas x 100 completions) is an upper bound on its time.

The package must be installed (``pip install -e .``, or ``pip install --no-deps --target DIR .`` and
``PYTHONPATH=DIR`` on a machine without the dependencies' installers). ``benchmarks/study_gpu.py``
compares these paths with the faster ones that replaced them.

Usage (GPU):  python benchmarks/train_gpu.py --out benchmarks/results/train_gpu.json
Smoke (CPU):  python benchmarks/train_gpu.py --shapes tiny --device cpu --out /tmp/train_gpu.json
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

from harness import QWEN25_05B, QWEN25_7B, TINY_QWEN2, machine, peak_gib, random_qwen2, sync

log = logging.getLogger("train_gpu")

SHAPES = {"qwen2.5-0.5b": QWEN25_05B, "qwen2.5-7b": QWEN25_7B, "tiny": TINY_QWEN2}

# The study's evaluation: 12 personas x 20 questions x 5 completions.
STUDY_EVAL_SEQUENCES = 12 * 100


def bench_generate(model, *, vocab: int, sequences: int, n_completions: int, new_tokens: int, prompt_len: int) -> dict:
    """Returns tokens/s of the HF sampler on one left-padded batch of ``sequences`` sequences."""
    import torch

    from persona_geometry.hf_decode import sample_token_ids

    model.eval()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    n_prompts = max(1, sequences // n_completions)
    # Prompts of slightly different lengths, as personas' system prompts are, so padding is exercised.
    prompts = [torch.randint(3, vocab, (prompt_len - (i % 7),), generator=g).tolist() for i in range(n_prompts)]
    common = dict(n_completions=n_completions, temperature=1.0, top_p=0.95, seed=0, pad_id=0, eos_ids=[], batch_size=n_prompts * n_completions, progress=False)
    sample_token_ids(model, prompts, max_new_tokens=4, min_new_tokens=4, **common)
    sync()
    started = time.perf_counter()
    out = sample_token_ids(model, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common)[0]
    sync()
    seconds = time.perf_counter() - started
    tokens = sum(len(c) for per_prompt in out for c in per_prompt)
    batch = n_prompts * n_completions
    return {
        "batch_sequences": batch,
        "prompt_tokens": prompt_len,
        "new_tokens_per_sequence": new_tokens,
        "generated_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "study_eval_sequences": STUDY_EVAL_SEQUENCES,
        "projected_study_eval_seconds": seconds * STUDY_EVAL_SEQUENCES / batch,
        "peak_memory_gib": peak_gib(),
    }


def bench_train(model, *, vocab: int, seq_len: int, prompt_len: int, warmup_steps: int, measured_steps: int, device_type: str, bf16: bool) -> dict:
    """Returns samples/s of the recipe's Trainer over ``measured_steps`` optimiser steps."""
    import torch
    from peft import get_peft_model
    from transformers import TrainerCallback

    from persona_geometry.training.lora import (
        IGNORE_INDEX,
        MarkerTrainConfig,
        _lora_config,
        _make_trainer,
    )

    steps = warmup_steps + measured_steps
    config = MarkerTrainConfig(max_steps=steps, save_steps=10**6, logging_steps=1, learning_rate=1e-5)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    g = torch.Generator().manual_seed(2)
    examples = []
    for _ in range(per_step * steps):
        ids = torch.randint(3, vocab, (seq_len,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt_len + ids[prompt_len:]})

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            stamps.append(time.perf_counter())

    model.train()
    model.config.use_cache = False
    peft_model = get_peft_model(model, _lora_config(config))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _make_trainer(
            peft_model, examples, config, output_dir=Path(tmp), device_type=device_type, bf16=bf16, pad_id=0, callbacks=[Timer()]
        )
        trainer.train()
    seconds = stamps[-1] - stamps[warmup_steps - 1]
    return {
        "recipe": config.to_dict(),
        "seq_len": seq_len,
        "supervised_tokens_per_sample": seq_len - prompt_len,
        "samples_per_optimizer_step": per_step,
        "warmup_steps": warmup_steps,
        "measured_steps": measured_steps,
        "seconds": seconds,
        "samples_per_s": measured_steps * per_step / seconds,
        "tokens_per_s": measured_steps * per_step * seq_len / seconds,
        "trainable_params": trainable,
        "peak_memory_gib": peak_gib(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq-len", type=int, default=300)
    parser.add_argument("--prompt-len", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--measured-steps", type=int, default=6)
    parser.add_argument("--gen-sequences", type=int, default=240, help="sequences in the one timed sampling batch")
    parser.add_argument("--gen-new-tokens", type=int, default=512)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import peft
    import torch
    import transformers

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {
        "benchmark": "benchmarks/train_gpu.py",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version()},
        "machine": machine(),
        "note": "random weights; sampling never stops early, so every sequence has the full number of new tokens",
        "shapes": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        entry: dict = {"config": shape}
        log.info("building %s", name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = random_qwen2(shape, device=device, dtype=dtype, max_position_embeddings=4096, use_cache=True)
        entry["params"] = sum(p.numel() for p in model.parameters())
        if not args.skip_generate:
            log.info("sampling with %s", name)
            entry["generate"] = bench_generate(
                model, vocab=shape["vocab_size"], sequences=args.gen_sequences, n_completions=5,
                new_tokens=args.gen_new_tokens, prompt_len=args.prompt_len,
            )
            log.info("%s sampling: %s", name, entry["generate"])
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        if not args.skip_train:
            log.info("training %s", name)
            entry["train"] = bench_train(
                model, vocab=shape["vocab_size"], seq_len=args.seq_len, prompt_len=args.prompt_len,
                warmup_steps=args.warmup_steps, measured_steps=args.measured_steps, device_type=device.type,
                bf16=dtype == torch.bfloat16,
            )
            log.info("%s training: %s", name, entry["train"])
        result["shapes"][name] = entry
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Written after every shape, so a run cut short still leaves what it measured.
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
