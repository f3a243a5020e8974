"""GPU extraction benchmark: this toolkit against what users would otherwise run, in one process.

Workload: a Qwen2.5-7B-Instruct-shaped model with random weights in bf16 (same FLOPs as the
real one), the 12 built-in personas × 20 probe questions rendered with a ChatML template,
``resid_post`` at all 28 layers, last token. Compared on one card, in one run:

1. ``persona_geometry.extract_activations`` (the ``hf`` engine);
2. Hugging Face ``output_hidden_states=True``, all prompts in one padded batch;
3. TransformerLens 4.x ``TransformerBridge.run_with_cache`` with a ``names_filter``;
4. one prompt at a time with forward hooks (what the reference study did).

Also measured: the card's bf16 GEMM rate, the roofline fraction
``ideal / measured`` with ``ideal = 2 × non-embedding params × real tokens / GEMM rate``, peak
GPU memory per method, safetensors load bandwidth, and an fp32 agreement check on a tiny model.

Usage (on a CUDA machine)::

    python benchmarks/extract_gpu.py --out benchmarks/results/extract_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


# The smoke mode (--smoke) runs the same code on the CPU with a tiny shape, to check the
# script before spending GPU time; its numbers mean nothing.
DEVICE = "cuda"
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def _reset_peak() -> None:
    if DEVICE == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gemm_tflops(n: int = 8192, reps: int = 20) -> float:
    """Returns the median bf16 matmul rate (TFLOP/s) of an n×n×n product on random data."""
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        a @ b
        _sync()
        times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


def timed(fn, *, warmup: int = 1, reps: int = 3) -> tuple[float, float, object]:
    """Returns (median seconds, peak GPU GiB above the baseline, last result) of ``fn()``."""
    out = None
    for _ in range(warmup):
        out = fn()
        _sync()
    del out
    _reset_peak()
    base = _allocated()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    peak = _peak()
    return statistics.median(times), (peak - base) / 2**30, out


def build_checkpoint(path: Path, config_kwargs: dict, vocab_size: int) -> None:
    """Writes a random-weight bf16 Qwen2 checkpoint and a ChatML tokenizer to ``path``."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from persona_geometry.tiny import _train_tokenizer

    tokenizer = _train_tokenizer(vocab_size)
    config = Qwen2Config(**config_kwargs, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    del model
    _reset_peak()


def non_embedding_params(model) -> int:
    """Returns the parameter count outside the token embedding and the unembedding."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def hf_hidden_states_one_batch(model, tokenizer, texts):
    """Baseline 2: one left-padded batch with output_hidden_states=True; keeps the last token."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(DEVICE)
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True)
    # hidden_states[l + 1] is block l's output, except the last entry (post final norm).
    return torch.stack([h[:, -1] for h in out.hidden_states[1:]], dim=1).float().cpu()


def one_at_a_time(model, tokenizer, texts, layers):
    """Baseline 4: one prompt per forward, forward hooks on every block, last position kept."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[:, -1].detach())

    handles = [layer.register_forward_hook(hook) for layer in layers]
    rows = []
    try:
        with torch.inference_mode():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(DEVICE)
                captured.clear()
                model.model(**ids)
                rows.append(torch.cat(captured, dim=0).float().cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows)


def transformer_lens_run_with_cache(bridge, tokenizer, texts, n_layers):
    """Baseline 3: TransformerBridge.run_with_cache, one left-padded batch, names_filter on resid_post."""
    names = {f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)}
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(DEVICE)
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(
            enc["input_ids"], attention_mask=enc["attention_mask"], names_filter=lambda n: n in names
        )
    return torch.stack([cache[f"blocks.{layer}.hook_resid_post"][:, -1] for layer in range(n_layers)], dim=1).float().cpu()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/extract_gpu.json")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is written")
    parser.add_argument("--skip", default="", help="comma-separated variants to skip: hf,tl,one,toolkit")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="check the script on the CPU with a tiny shape")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one toolkit call")
    args = parser.parse_args()
    global DEVICE, QWEN7B
    if args.smoke:
        DEVICE, QWEN7B = "cpu", TINY
    elif not torch.cuda.is_available():
        print("extract_gpu.py needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test, numbers meaningless)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "workload": "Qwen2.5-7B-Instruct shape, random bf16 weights; 12 personas x 20 questions; resid_post, 28 layers, last token",
    }
    print(f"device: {result['device']}", flush=True)
    result["gemm_tflops"] = gemm_tflops(8192 if DEVICE == "cuda" else 256)
    print(f"GEMM bf16: {result['gemm_tflops']:.0f} TFLOP/s", flush=True)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pg-bench-"))
    measure_7b(result, workdir, skip, args.reps, args.profile)
    _reset_peak()

    result["max_abs_diff_fp32"] = fp32_check(workdir)
    print(json.dumps(result, indent=2), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


def measure_7b(result: dict, workdir: Path, skip: set[str], reps: int, profile: bool = False) -> None:
    """Builds the 7B-shaped checkpoint, loads it, and times every variant into ``result``."""
    from persona_geometry import (
        builtin_personas,
        builtin_questions,
        extract_activations,
        load_model,
        render_prompts,
    )

    ckpt = workdir / "qwen7b-random"
    t0 = time.perf_counter()
    build_checkpoint(ckpt, QWEN7B, vocab_size=4096)
    result["build_checkpoint_s"] = time.perf_counter() - t0
    weights_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))

    # Model load: safetensors -> GPU, bf16. Page cache is warm after the write; say so.
    _sync()
    t0 = time.perf_counter()
    handle = load_model(str(ckpt), device=DEVICE, dtype="bfloat16")
    _sync()
    load_s = time.perf_counter() - t0
    result["load_s"] = load_s
    result["load_gb_per_s"] = weights_bytes / 1e9 / load_s
    result["load_note"] = "files were just written, so they come from the page cache, not disk"
    model, tokenizer = handle.model, handle.tokenizer
    tokenizer.padding_side = "left"
    weights_gib = _allocated() / 2**30
    result["weights_gib"] = weights_gib

    personas, questions = builtin_personas(), builtin_questions()
    prompts = render_prompts(tokenizer, personas, questions)
    texts = [p.text for p in prompts]
    n_tokens = sum(p.n_tokens for p in prompts)
    result["n_prompts"] = len(texts)
    result["real_tokens"] = n_tokens
    # Tokens once each persona's shared system block is counted once (what a prefix cache computes).
    q = len(questions)
    prefix = [os.path.commonprefix([list(p.input_ids) for p in prompts.prompts[i * q : (i + 1) * q]]) for i in range(len(personas))]
    result["unique_tokens"] = n_tokens - sum(len(pre) * (q - 1) for pre in prefix)
    params = non_embedding_params(model)
    result["non_embedding_params"] = params
    result["ideal_s"] = 2 * params * n_tokens / (result["gemm_tflops"] * 1e12)
    result["ideal_unique_s"] = 2 * params * result["unique_tokens"] / (result["gemm_tflops"] * 1e12)
    print(f"{len(texts)} prompts, {n_tokens} tokens ({result['unique_tokens']} unique); ideal {result['ideal_s']:.3f}s", flush=True)

    layers = model.model.layers
    n_layers = len(layers)
    times, peaks, outs = {}, {}, {}
    if "toolkit" not in skip:
        times["toolkit"], peaks["toolkit"], acts = timed(
            lambda: extract_activations(handle, personas, questions, progress=False), reps=reps
        )
        outs["toolkit"] = acts["resid_post"].float().reshape(len(texts), n_layers, -1)
        # The same engine without the shared-prefix KV cache: every prompt in full.
        times["toolkit_full_prompts"], peaks["toolkit_full_prompts"], full = timed(
            lambda: extract_activations(handle, personas, questions, share_prefix=False, progress=False), reps=reps
        )
        outs["toolkit_full_prompts"] = full["resid_post"].float().reshape(len(texts), n_layers, -1)
        t0 = time.perf_counter()
        render_prompts(tokenizer, personas, questions)
        result["render_prompts_s"] = time.perf_counter() - t0
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            extract_activations(handle, personas, questions, progress=False)
            _sync()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
                extract_activations(handle, personas, questions, progress=False)
                _sync()
            print(tprof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
            # Host transfer of one chunk's activations: pageable vs pinned.
            buf = torch.randn(len(texts), n_layers, model.config.hidden_size, device=DEVICE)
            for label, fn in (
                ("pageable", lambda: buf.to("cpu")),
                ("pinned+alloc", lambda: torch.empty(buf.shape, pin_memory=True).copy_(buf, non_blocking=True)),
            ):
                t_d2h, _, _ = timed(fn, reps=5)
                result[f"d2h_{label}_s"] = t_d2h
                print(f"D2H {buf.numel() * 4 / 1e6:.0f} MB {label}: {t_d2h * 1e3:.1f} ms", flush=True)
    if "hf" not in skip:
        times["hf_hidden_states"], peaks["hf_hidden_states"], outs["hf_hidden_states"] = timed(
            lambda: hf_hidden_states_one_batch(model, tokenizer, texts), reps=reps
        )
    if "one" not in skip:
        times["one_at_a_time"], peaks["one_at_a_time"], outs["one_at_a_time"] = timed(
            lambda: one_at_a_time(model, tokenizer, texts, layers), reps=1
        )
    if "tl" not in skip:
        try:
            from transformer_lens.model_bridge import TransformerBridge

            bridge = TransformerBridge.boot_transformers(str(ckpt), hf_model=model, tokenizer=tokenizer)
            times["transformer_lens"], peaks["transformer_lens"], outs["transformer_lens"] = timed(
                lambda: transformer_lens_run_with_cache(bridge, tokenizer, texts, n_layers), reps=reps
            )
            del bridge
        except Exception as e:  # Reported, not fatal: the other numbers still stand.
            result["transformer_lens_error"] = f"{type(e).__name__}: {e}"
            print(f"TransformerLens failed: {result['transformer_lens_error']}", flush=True)

    for name, t in times.items():
        result[f"{name}_s"] = t
        result.setdefault("peak_mem_gb", {})[name] = weights_gib + peaks[name]
        result.setdefault("peak_mem_above_weights_gb", {})[name] = peaks[name]
    if "toolkit" in times:
        result["toolkit_s"] = times["toolkit"]
        result["roofline_fraction"] = result["ideal_s"] / times["toolkit"]
        result["roofline_fraction_unique_tokens"] = result["ideal_unique_s"] / times["toolkit"]
        for other in ("hf_hidden_states", "transformer_lens", "one_at_a_time"):
            if other in times:
                result[f"speedup_vs_{other}"] = times[other] / times["toolkit"]
        # bf16 agreement with the one-at-a-time reference (batching changes bf16 rounding).
        if "one_at_a_time" in outs:
            ref = outs["one_at_a_time"]
            for name in ("toolkit", "toolkit_full_prompts"):
                rel = (outs[name] - ref).norm() / ref.norm()
                result[f"bf16_rel_diff_vs_one_at_a_time_{name}"] = rel.item()


def fp32_check(workdir: Path) -> float:
    """Returns the max abs difference, fp32 on the GPU, between the toolkit and one-at-a-time HF."""
    from persona_geometry import (
        builtin_personas,
        builtin_questions,
        extract_activations,
        load_model,
        render_prompts,
    )
    from persona_geometry.tiny import TinyModelSpec, build_tiny_model

    path = build_tiny_model(workdir / "tiny", TinyModelSpec(num_hidden_layers=4))
    handle = load_model(str(path), device=DEVICE, dtype="float32")
    personas, questions = builtin_personas(), builtin_questions()
    acts = extract_activations(handle, personas, questions, progress=False)["resid_post"]
    full = extract_activations(handle, personas, questions, share_prefix=False, progress=False)["resid_post"]
    prompts = render_prompts(handle.tokenizer, personas, questions)
    worst = 0.0
    model = handle.model
    captured = {}
    last = model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("last", (o[0] if isinstance(o, tuple) else o)[0, -1]))
    try:
        with torch.inference_mode():
            for k, p in enumerate(prompts.prompts):
                ids = torch.tensor([p.input_ids], device=DEVICE)
                hs = model(ids, output_hidden_states=True).hidden_states
                ref = torch.stack([h[0, -1] for h in hs[1:-1]] + [captured["last"]]).cpu()
                for got in (acts[k // len(questions), k % len(questions)], full[k // len(questions), k % len(questions)]):
                    worst = max(worst, (got.float() - ref.float()).abs().max().item())
    finally:
        last.remove()
    return worst


def print_table(result: dict) -> None:
    print("\nmethod               time (s)   peak GiB   speedup of toolkit")
    for name in ("toolkit", "toolkit_full_prompts", "hf_hidden_states", "transformer_lens", "one_at_a_time"):
        if f"{name}_s" in result:
            sp = result.get(f"speedup_vs_{name}", 1.0 if name == "toolkit" else float("nan"))
            print(f"{name:20s} {result[f'{name}_s']:8.3f}   {result['peak_mem_gb'][name]:8.1f}   {sp:6.2f}x")
    print(f"ideal {result['ideal_s']:.3f}s (unique tokens {result['ideal_unique_s']:.3f}s); "
          f"roofline {result.get('roofline_fraction', float('nan')):.2f}; fp32 max|diff| {result['max_abs_diff_fp32']:.2e}")


if __name__ == "__main__":
    sys.exit(main())
