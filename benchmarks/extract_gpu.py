"""GPU extraction benchmark: this toolkit against what users would otherwise run, in one process.

Model: a Qwen2.5-7B-Instruct-shaped model with random weights in bf16 (same FLOPs as the real
one); ``resid_post`` at all 28 layers, last token. Two workloads, each in one run:

- ``builtin``: the 12 built-in personas × 20 probe questions (ChatML template);
- ``long_prompts``: 75 generated personas with long, varied system prompts (hundreds of
  tokens) × 20 questions of varied length (1,500 prompts).

Methods, per workload:

1. ``toolkit``: ``extract_activations`` with its defaults (packed, prefix-tree mask, FlexAttention,
   each decoder block through ``torch.compile`` on a GPU; the first call compiles);
2. ``toolkit_full_prompts``: the same without prefix sharing (every prompt in full);
3. ``toolkit_padded``: ``pack=False``, the padded engines (shared-prefix KV cache);
4. ``toolkit_uncompiled`` (and ``toolkit_full_prompts_uncompiled``): ``compile_blocks=False``;
5. ``best_plain_hf``: what a careful user writes with Hugging Face alone: length-sorted batches
   under a token budget, left padding, position ids from the mask, last-token hooks on the
   blocks, forward cut after the last block;
6. ``transformer_lens``: TransformerLens 4.x ``run_with_cache`` with a ``names_filter``, in the
   same length-sorted batches;
7. ``hf_hidden_states`` (builtin only): ``output_hidden_states=True``, all prompts in one batch;
8. ``one_at_a_time`` (builtin only): one prompt per forward with hooks.

Roofline: ``ideal = 2 × non-embedding params × tokens / measured bf16 GEMM rate``, over all
prompt tokens (``ideal_s``) or over the unique tokens, each persona's shared prefix counted once
(``ideal_unique_s``). Also: peak GPU memory above the weights per method, a kernel profile of
the toolkit, and an fp32 agreement check on a tiny model.

Usage (on a CUDA machine; ``--smoke`` checks the script on the CPU with a tiny shape)::

    python benchmarks/extract_gpu.py --out benchmarks/results/extract_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run from a checkout without installing: the package is the folder above this one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import QWEN25_7B, TINY_QWEN2, machine, save_random_qwen2  # noqa: E402

QWEN7B = QWEN25_7B
# The smoke mode (--smoke) runs the same code on the CPU with a tiny shape, to check the
# script before spending GPU time; its numbers mean nothing.
DEVICE = "cuda"


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


def sustained_gemm_tflops(n: int = 8192, seconds: float = 3.0) -> dict:
    """Returns the n×n×n bf16 matmul rate over the first 0.1 s and over the last second of
    ``seconds`` of back-to-back products: whether the clocks hold under a load as long as
    the long workload's."""
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    marks = []
    _sync()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            a @ b
        _sync()
        marks.append(time.perf_counter() - t0)
    flops = 4 * 2 * n**3
    first = [m for m in marks if m <= 0.1]
    late = [m for m in marks if m >= seconds - 1.0]
    return {
        "first_0.1s_tflops": flops * len(first) / first[-1] / 1e12 if first else None,
        "last_1s_tflops": flops * (len(late) - 1) / (late[-1] - late[0]) / 1e12,
        "seconds": seconds,
    }


def block_gemms_by_tokens(shape: dict, tokens: list[int], reps: int = 10) -> list[dict]:
    """Returns the bf16 rate of one decoder block's seven projections (``F.linear``, as
    transformers runs them) at each pack length, in a shuffled order with a control length
    (4096) every eighth point, so a drift of the clocks shows apart from the shapes."""
    d, inner = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    weights = [torch.randn(o, i, device=DEVICE, dtype=torch.bfloat16) for o, i in ((d, d), (kv, d), (kv, d), (d, d), (inner, d), (inner, d), (d, inner))]
    flops_per_token = 2 * sum(w.numel() for w in weights)
    order = list(tokens)
    random.Random(0).shuffle(order)
    order = [n for k, n in enumerate(order) for n in ([4096, n] if k % 8 == 0 else [n])]
    out = []
    x_all = torch.randn(max(order), d, device=DEVICE, dtype=torch.bfloat16)
    h_all = torch.randn(max(order), inner, device=DEVICE, dtype=torch.bfloat16)
    for n in order:
        inputs = [x_all[:n]] * 6 + [h_all[:n]]
        for rep in range(reps + 1):
            if rep == 1:  # the first pass warms up
                _sync()
                t0 = time.perf_counter()
            for a, w in zip(inputs, weights, strict=True):
                torch.nn.functional.linear(a, w)
        _sync()
        dt = (time.perf_counter() - t0) / reps
        out.append({"tokens": n, "ms": dt * 1e3, "tflops": flops_per_token * n / dt / 1e12})
    return out


def split_gemms(shape: dict, tokens: list[int], reps: int = 10) -> list[dict]:
    """Returns one block's projections at ``tokens`` rows in one GEMM each against the same rows
    in two halves (written in place), per projection: whether cutting a pack's rows pays."""
    d, inner = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    out = []
    for name, (o, i) in {"q_o": (d, d), "k_v": (kv, d), "gate_up": (inner, d), "down": (d, inner)}.items():
        w = torch.randn(o, i, device=DEVICE, dtype=torch.bfloat16)
        for n in tokens:
            x = torch.randn(n, i, device=DEVICE, dtype=torch.bfloat16)
            y = torch.empty(n, o, device=DEVICE, dtype=torch.bfloat16)
            h = n // 2
            row = {"projection": name, "tokens": n}
            for label, pieces in (("one_ms", [slice(0, n)]), ("halves_ms", [slice(0, h), slice(h, n)])):
                for rep in range(reps + 1):
                    if rep == 1:  # the first pass warms up
                        _sync()
                        t0 = time.perf_counter()
                    for rows in pieces:
                        torch.mm(x[rows], w.t(), out=y[rows])
                _sync()
                row[label] = (time.perf_counter() - t0) / reps * 1e3
            out.append(row)
    return out


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
        # The previous result goes first, as a user's would: keeping it alive made every other
        # call page-lock a fresh result (602 MB on the long workload: +0.34 s in one run).
        out = None
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    peak = _peak()
    LAST_TIMES[:] = times
    return statistics.median(times), (peak - base) / 2**30, out


LAST_TIMES: list[float] = []  # every timed call of the last ``timed``


@contextlib.contextmanager
def _patched(module, name, value):
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


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


def best_plain_hf(model, tokenizer, ids, n_layers, batch_tokens=16384):
    """Baseline: length-sorted batches under a padded-token budget, last-token hooks, cut after the last block."""
    base = model.model
    layers = base.layers
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(ids[cur[0]]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    out = torch.empty(len(ids), n_layers, model.config.hidden_size, device=DEVICE)
    state = {}

    class Stop(Exception):
        pass

    def hook(layer):
        def fn(_m, _a, o):
            state["buf"][:, layer] = (o[0] if isinstance(o, tuple) else o)[:, -1]
            if layer == n_layers - 1:
                raise Stop

        return fn

    handles = [layers[layer].register_forward_hook(hook(layer)) for layer in range(n_layers)]
    try:
        with torch.inference_mode():
            for batch in batches:
                width = len(ids[batch[0]])
                x = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):
                    x[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                    mask[r, width - len(ids[i]) :] = 1
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                x, mask, pos = x.to(DEVICE), mask.to(DEVICE), pos.to(DEVICE)
                state["buf"] = torch.empty(len(batch), n_layers, model.config.hidden_size, device=DEVICE)
                try:
                    base(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False)
                except Stop:
                    pass
                out[torch.tensor(batch, device=DEVICE)] = state["buf"]
    finally:
        for h in handles:
            h.remove()
    return out.cpu()


def transformer_lens_batched(bridge, tokenizer, ids, n_layers, batch_tokens=16384):
    """Baseline: TransformerBridge.run_with_cache in length-sorted, left-padded batches, names_filter on resid_post."""
    names = {f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(ids[cur[0]]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    out = torch.empty(len(ids), n_layers, bridge.cfg.d_model)
    with torch.inference_mode():
        for batch in batches:
            width = len(ids[batch[0]])
            x = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                x[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]) :] = 1
            _, cache = bridge.run_with_cache(
                x.to(DEVICE), attention_mask=mask.to(DEVICE), names_filter=lambda n: n in names, return_type=None
            )
            out[torch.tensor(batch)] = torch.stack(
                [cache[f"blocks.{layer}.hook_resid_post"][:, -1] for layer in range(n_layers)], dim=1
            ).float().cpu()
            del cache
    return out


def long_workload(n_personas: int, n_questions: int, seed: int = 0):
    """Returns personas with long, varied system prompts and questions of varied length (deterministic)."""
    from persona_geometry import Persona, builtin_personas, builtin_questions

    words = " ".join([p.system_prompt for p in builtin_personas()] + list(builtin_questions())).split()
    rng = random.Random(seed)
    personas = []
    for k in range(n_personas):
        n = rng.randint(120, 480)
        personas.append(Persona(name=f"p{k:03d}", system_prompt=f"You are persona {k}. " + " ".join(rng.choice(words) for _ in range(n))))
    questions = []
    for k in range(n_questions):
        n = rng.choice([3, 6, 10, 20, 40, 80, 120])
        questions.append(f"Question {k}: " + " ".join(rng.choice(words) for _ in range(n)) + "?")
    return personas, questions


def host_stages(fn) -> dict:
    """Returns when each host stage of one ``extract_activations`` call started and how long it
    took (ms from the call's start; a stage run several times: its first run and its count)."""
    from persona_geometry import extract, landing, packing

    stages: dict = {}
    t_call = [0.0]
    patches = []
    for module, names in (
        (extract, ("_validate", "render_prompts_unchecked", "render_prompts", "_plan", "_manifest", "_plan_units", "build_pack", "_run", "_run_chunk", "_assemble", "finish_copies")),
        (packing, ("block_mask",)),
        (landing.Landing, ("land", "finish")),
    ):
        for name in names:
            original = getattr(module, name)

            def wrapped(*a, __original=original, __name=name, **k):
                t = time.perf_counter()
                try:
                    return __original(*a, **k)
                finally:
                    entry = stages.setdefault(__name, {"start_ms": (t - t_call[0]) * 1e3, "ms": (time.perf_counter() - t) * 1e3, "calls": 0})
                    entry["calls"] += 1

            patches.append(_patched(module, name, wrapped))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        _sync()
        t_call[0] = time.perf_counter()
        fn()
        _sync()
        stages["call_ms"] = (time.perf_counter() - t_call[0]) * 1e3
    return stages


def kernel_profile(fn, top: int = 30) -> dict:
    """Returns the CUDA time of one call of ``fn`` by kernel family and the top kernels."""
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("benchmark_call"):
            fn()
            _sync()
    timeline = gpu_timeline(prof.events())
    events = [
        e for e in prof.key_averages()
        if getattr(e, "device_time_total", 0) > 0 and e.device_type.name == "CUDA" and e.key != "benchmark_call"
    ]  # fmt: skip
    total = sum(e.device_time_total for e in events) or 1.0
    families: dict[str, float] = {}
    for e in events:
        n = e.key.lower()
        fam = (
            "gemm" if any(k in n for k in ("gemm", "cutlass", "sm90", "nvjet", "matmul", "cublas"))
            else "flex_attention" if "flex" in n or "triton_tem" in n
            # Compiled kernels before copies: inductor names the RMSNorms "..._to_copy_mean_...".
            else "fused elementwise/norm/rotary (compiled)" if n.startswith("triton_")
            else "copy" if "copy" in n or "memcpy" in n or "memset" in n
            else "elementwise/norm/rotary"
        )
        families[fam] = families.get(fam, 0.0) + e.device_time_total
    kernels = sorted(events, key=lambda e: -e.device_time_total)[:top]
    return {
        **timeline,
        "cuda_time_ms": total / 1e3,
        "share_by_family": {k: v / total for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": e.key[:120], "ms": e.device_time_total / 1e3, "calls": e.count} for e in kernels],
    }


def gpu_timeline(events) -> dict:
    """Returns where the GPU idled during the profiled call: before its first kernel (host work
    up front), between kernels, and after its last one."""
    call = next(e for e in events if e.name == "benchmark_call")
    # Kernels and copies only: the GPU-side span of the call's own annotation covers them all
    # and would hide every gap (it did until the fourth session's runs).
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type.name == "CUDA" and e.name != "benchmark_call" and not getattr(e, "is_user_annotation", False)
    )
    if not spans:
        return {}
    busy, gap = 0.0, 0.0
    gaps = []
    start, end, last = spans[0]
    for s, e, name in spans[1:]:
        if s > end:
            busy, gap = busy + end - start, gap + s - end
            gaps.append((s - end, last, name))
            start, end = s, e
        else:
            end = max(end, e)
        last = name
    busy += end - start
    gaps.sort(reverse=True)
    return {
        "call_ms": (call.time_range.end - call.time_range.start) / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "idle_before_first_kernel_ms": (spans[0][0] - call.time_range.start) / 1e3,
        "idle_between_kernels_ms": gap / 1e3,
        "idle_after_last_kernel_ms": (call.time_range.end - end) / 1e3,
        "gaps_between_kernels": len(gaps),
        "largest_gaps": [{"us": round(g, 1), "after": a[:60], "before": b[:60]} for g, a, b in gaps[:8]],
    }


class Budget:
    """Wall-clock guard: slow baselines are skipped (and recorded as skipped) once time runs short."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/extract_gpu.json")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is written")
    parser.add_argument("--skip", default="", help="comma-separated methods to skip")
    parser.add_argument("--workloads", default="builtin,long_prompts")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds; slow baselines are skipped past it")
    parser.add_argument("--smoke", action="store_true", help="check the script on the CPU with a tiny shape")
    args = parser.parse_args()
    global DEVICE, QWEN7B
    if args.smoke:
        DEVICE, QWEN7B = "cpu", TINY_QWEN2
        # Trace with dynamo but skip code generation: the CPU compiler would take minutes.
        torch.compile = functools.partial(torch.compile, backend="eager")
    elif not torch.cuda.is_available():
        print("extract_gpu.py needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    budget = Budget(args.time_budget)
    skip = set(filter(None, args.skip.split(",")))
    import transformers

    result: dict = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test, numbers meaningless)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": machine(),
        "model": "Qwen2.5-7B-Instruct shape, random bf16 weights; resid_post, 28 layers, last token",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"device: {result['device']}", flush=True)
    result["gemm_tflops"] = gemm_tflops(8192 if DEVICE == "cuda" else 256)
    print(f"GEMM bf16: {result['gemm_tflops']:.0f} TFLOP/s", flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pg-bench-"))
    measure_7b(result, workdir, skip, args.reps, args.workloads.split(","), budget, save)
    save()
    _reset_peak()
    if budget.left() > 15:
        try:
            result["max_abs_diff_fp32"] = fp32_check(workdir)
        except Exception as e:  # Reported, not fatal.
            result["fp32_check_error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"fp32 check: {result.get('max_abs_diff_fp32', result.get('fp32_check_error'))}", flush=True)
    try:  # Recompiles of FlexAttention or the compiled blocks would show here.
        from torch._dynamo.utils import counters

        result["dynamo_counters"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")}
    except Exception as e:
        result["dynamo_counters"] = f"{type(e).__name__}: {e}"
    save()
    print_table(result)
    return 0


def measure_7b(result: dict, workdir: Path, skip: set[str], reps: int, workloads: list[str], budget: Budget, save) -> None:
    """Builds the 7B-shaped checkpoint, loads it, and times every method on every workload into ``result``."""
    from persona_geometry import (
        builtin_personas,
        builtin_questions,
        extract_activations,
        load_model,
        render_prompts,
    )

    ckpt = workdir / "qwen7b-random"
    t0 = time.perf_counter()
    save_random_qwen2(ckpt, QWEN7B, device=DEVICE)
    _reset_peak()
    result["build_checkpoint_s"] = time.perf_counter() - t0
    weights_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    _sync()
    t0 = time.perf_counter()
    handle = load_model(str(ckpt), device=DEVICE, dtype="bfloat16")
    _sync()
    result["load_s"] = time.perf_counter() - t0
    result["load_gb_per_s"] = weights_bytes / 1e9 / result["load_s"]
    result["load_note"] = "files were just written, so they come from the page cache, not disk"
    model, tokenizer = handle.model, handle.tokenizer
    tokenizer.padding_side = "left"
    weights_gib = _allocated() / 2**30
    result["weights_gib"] = weights_gib
    params = non_embedding_params(model)
    result["non_embedding_params"] = params
    n_layers = len(model.model.layers)
    if "gemm_sweep" not in skip and DEVICE == "cuda":
        result["sustained_gemm"] = sustained_gemm_tflops()
        result["block_gemms_by_tokens"] = block_gemms_by_tokens(QWEN7B, list(range(2048, 12289, 128)))
        result["split_gemms"] = split_gemms(QWEN7B, [4480, 8448, 8960, 9344])
        save()
    result["workloads"] = {}
    result["tried"] = {}
    bridge = None

    def one_workload(name, bridge):
        if name == "builtin":
            personas, questions = builtin_personas(), builtin_questions()
            if DEVICE == "cpu":  # smoke test: fewer prompts
                personas, questions = personas[:4], questions[:6]
        else:
            personas, questions = long_workload(75, 20) if DEVICE == "cuda" else long_workload(3, 4)
        prompts = render_prompts(tokenizer, personas, questions)
        ids = [p.input_ids for p in prompts]
        texts = [p.text for p in prompts]
        q = len(questions)
        prefix = [os.path.commonprefix([list(x) for x in ids[i * q : (i + 1) * q]]) for i in range(len(personas))]
        n_tokens = sum(len(x) for x in ids)
        w: dict = {
            "n_prompts": len(ids),
            "n_personas": len(personas),
            "n_questions": q,
            "real_tokens": n_tokens,
            "unique_tokens": n_tokens - sum(len(pre) * (q - 1) for pre in prefix),
            "prompt_tokens_min_mean_max": [min(map(len, ids)), n_tokens / len(ids), max(map(len, ids))],
        }
        w["ideal_s"] = 2 * params * n_tokens / (result["gemm_tflops"] * 1e12)
        w["ideal_unique_s"] = 2 * params * w["unique_tokens"] / (result["gemm_tflops"] * 1e12)
        result["workloads"][name] = w
        print(f"[{name}] {len(ids)} prompts, {n_tokens} tokens ({w['unique_tokens']} unique); "
              f"ideal {w['ideal_s']:.3f}s, unique {w['ideal_unique_s']:.3f}s", flush=True)
        big = name != "builtin"
        r = 1 if big else reps
        times, peaks, outs = {}, {}, {}

        def run(method, fn, reps_=r, warmup=1, need=0.0):
            if method in skip:
                return
            if budget.left() < need:
                w.setdefault("skipped", {})[method] = f"time budget: {budget.left():.0f}s left, needs ~{need:.0f}s"
                print(f"  {method}: skipped (time budget)", flush=True)
                return
            try:
                t, p, o = timed(fn, warmup=warmup, reps=reps_)
            except Exception as e:  # Reported, not fatal: the other numbers still stand.
                w.setdefault("errors", {})[method] = f"{type(e).__name__}: {e}"[:500]
                print(f"  {method}: FAILED {w['errors'][method]}", flush=True)
                return
            times[method], peaks[method], outs[method] = t, p, o
            print(f"  {method}: {t:.3f}s, peak above weights {p:.2f} GiB", flush=True)
            w[f"{method}_s"] = t
            w.setdefault("each_call_s", {})[method] = LAST_TIMES[:]
            w.setdefault("peak_mem_above_weights_gb", {})[method] = p
            save()

        def toolkit(**kw):
            acts = extract_activations(handle, personas, questions, progress=False, **kw)
            w.setdefault("manifest", {})[json.dumps(kw, sort_keys=True)] = {
                k: acts.manifest[k] for k in ("forward", "batch_tokens", "chunk_prompts", "share_prefix", "compile_blocks")
            }
            return acts["resid_post"].reshape(len(ids), n_layers, -1)

        t0 = time.perf_counter()
        render_prompts(tokenizer, personas, questions)
        w["render_prompts_s"] = time.perf_counter() - t0
        if "toolkit" not in skip:
            t0 = time.perf_counter()
            toolkit()  # the first call in the process compiles the blocks
            w["toolkit_first_call_s_incl_compile"] = time.perf_counter() - t0
            w["host_stages_ms"] = host_stages(toolkit)
        run("toolkit", toolkit, reps_=reps if not big else 3, warmup=2 if not big else 1)
        if "untrimmed" not in skip:
            # The last block's MLP on every token, as before the fourth session (rows_only off).
            from persona_geometry import packing

            def untrimmed():
                with _patched(packing, "rows_only", lambda block: contextlib.nullcontext()):
                    return toolkit()

            run("toolkit_untrimmed", untrimmed, reps_=reps if not big else 3, warmup=1)
        # Heavy baselines on the long workload: one timed call (shapes were compiled on builtin).
        heavy = dict(reps_=1, warmup=0) if big else {}
        run("toolkit_full_prompts", lambda: toolkit(share_prefix=False), need=25 if big else 0, **heavy)
        run("best_plain_hf", lambda: best_plain_hf(model, tokenizer, ids, n_layers), need=30 if big else 0, **heavy)
        if not big:
            run("hf_hidden_states", lambda: hf_hidden_states_one_batch(model, tokenizer, texts))
            run("one_at_a_time", lambda: one_at_a_time(model, tokenizer, texts, model.model.layers), reps_=1, warmup=0, need=30)
        if "uncompiled" not in skip:
            run("toolkit_uncompiled", lambda: toolkit(compile_blocks=False), reps_=reps if not big else 2, need=30 if big else 0)
            run("toolkit_full_prompts_uncompiled", lambda: toolkit(share_prefix=False, compile_blocks=False), need=25 if big else 0, **heavy)
        run("toolkit_padded", lambda: toolkit(pack=False), need=15 if big else 0, **heavy)
        if "transformer_lens" not in skip and budget.left() > (60 if big else 20):
            try:
                if bridge is None:
                    from transformer_lens.model_bridge import TransformerBridge

                    # The bridge rewrites the model it wraps in place: give it a copy.
                    bridge = TransformerBridge.boot_transformers(str(ckpt), hf_model=copy.deepcopy(model), tokenizer=tokenizer)
                run("transformer_lens", lambda: transformer_lens_batched(bridge, tokenizer, ids, n_layers), need=50 if big else 0, **heavy)
            except Exception as e:
                w.setdefault("errors", {})["transformer_lens"] = f"{type(e).__name__}: {e}"[:500]
                print(f"  transformer_lens: FAILED {w['errors']['transformer_lens']}", flush=True)
        elif "transformer_lens" not in skip:
            w.setdefault("skipped", {})["transformer_lens"] = f"time budget: {budget.left():.0f}s left"
        if "profile" not in skip and budget.left() > 20:
            try:
                w["kernel_profile_toolkit"] = kernel_profile(toolkit)
            except Exception as e:
                w["kernel_profile_error"] = f"{type(e).__name__}: {e}"[:500]

        if "toolkit" in times:
            t = times["toolkit"]
            w["roofline_fraction"] = w["ideal_s"] / t
            w["roofline_fraction_unique_tokens"] = w["ideal_unique_s"] / t
            for other in times:
                if other != "toolkit":
                    w[f"speedup_vs_{other}"] = times[other] / t
            if "best_plain_hf" in outs:
                ref = outs["best_plain_hf"].float()
                for m in ("toolkit", "toolkit_full_prompts", "toolkit_padded"):
                    if m in outs:
                        w[f"bf16_rel_diff_vs_best_plain_hf_{m}"] = ((outs[m].float() - ref).norm() / ref.norm()).item()
        if "toolkit_full_prompts" in times:
            w["roofline_fraction_full_prompts"] = w["ideal_s"] / times["toolkit_full_prompts"]
        if "toolkit_untrimmed" in times:
            w["roofline_fraction_unique_tokens_untrimmed"] = w["ideal_unique_s"] / times["toolkit_untrimmed"]
        if "toolkit_uncompiled" in times:
            w["roofline_fraction_unique_tokens_uncompiled"] = w["ideal_unique_s"] / times["toolkit_uncompiled"]
        if "toolkit_full_prompts_uncompiled" in times:
            w["roofline_fraction_full_prompts_uncompiled"] = w["ideal_s"] / times["toolkit_full_prompts_uncompiled"]
        outs.clear()
        save()
        return bridge

    for name in workloads:
        bridge = one_workload(name, bridge)


def fp32_check(workdir: Path) -> float:
    """Returns the max abs difference, fp32 on the device, between the toolkit (packed) and one-at-a-time HF."""
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
    if DEVICE == "cpu":  # smoke test: fewer prompts
        personas, questions = personas[:3], questions[:4]
    runs = [
        extract_activations(handle, personas, questions, progress=False),
        extract_activations(handle, personas, questions, share_prefix=False, progress=False),
        extract_activations(handle, personas, questions, pack=False, progress=False),
    ]
    print("fp32 check paths:", [a.manifest["forward"] for a in runs], flush=True)
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
                for acts in runs:
                    got = acts["resid_post"][k // len(questions), k % len(questions)]
                    worst = max(worst, (got.float() - ref.float()).abs().max().item())
    finally:
        last.remove()
    return worst


def print_table(result: dict) -> None:
    for name, w in result.get("workloads", {}).items():
        print(f"\n[{name}] ideal all tokens {w['ideal_s']:.3f}s, unique {w['ideal_unique_s']:.3f}s")
        print("method                    time (s)   peak above weights (GiB)")
        for m, p in w.get("peak_mem_above_weights_gb", {}).items():
            print(f"{m:25s} {w[m + '_s']:8.3f}   {p:8.2f}")
        for k in ("roofline_fraction_unique_tokens", "roofline_fraction_full_prompts", "roofline_fraction_unique_tokens_uncompiled", "roofline_fraction_full_prompts_uncompiled"):
            if k in w:
                print(f"{k}: {w[k]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
