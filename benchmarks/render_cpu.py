"""CPU benchmark of the host work before an extraction's first forward: rendering and tokenising
every persona × question prompt.

On a GPU the built-in study's forward takes ~90 ms, and everything the host does before it is
added to the call (``benchmarks/extract_gpu.py``). Measured here, on the two workloads of that
benchmark and with its ChatML tokenizer:

- ``baseline``: what a careful user writes: every conversation through one batched
  ``apply_chat_template(tokenize=False)``, then one batched tokeniser call on all the texts;
- ``render_prompts``: the toolkit's, checked (each persona rendered once around a sentinel
  question, each distinct head and tail tokenised once, then ``P + Q - 1`` real renders and
  each persona's first prompt tokenised in full to check);
- ``render_prompts_unchecked``: the part ``extract_activations`` runs before the device starts
  (the checks then run while the first forward does), and ``checks``: the rest.

All three give the same texts and token ids (asserted).

Usage::

    python benchmarks/render_cpu.py --out benchmarks/results/render_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from harness import machine


def _median_ms(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def _measure(tokenizer, personas, questions, reps: int) -> dict:
    from persona_geometry.prompts import chat_messages, render_prompts, render_prompts_unchecked

    def baseline():
        convs = [chat_messages(p, q) for p in personas for q in questions]
        texts = tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        return texts, tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    base_ms, (texts, ids) = _median_ms(baseline, reps)
    checked_ms, checked = _median_ms(lambda: render_prompts(tokenizer, personas, questions), reps)
    unchecked_ms, (unchecked, _) = _median_ms(lambda: render_prompts_unchecked(tokenizer, personas, questions), reps)
    checks_ms = statistics.median(
        _median_ms(render_prompts_unchecked(tokenizer, personas, questions)[1], 1)[0] for _ in range(reps)
    )
    for prompts in (checked, unchecked):
        assert [p.text for p in prompts] == list(texts)
        assert [list(p.input_ids) for p in prompts] == [list(x) for x in ids]
    return {
        "prompts": len(texts),
        "tokens": sum(map(len, ids)),
        "baseline_ms": base_ms,
        "render_prompts_ms": checked_ms,
        "render_prompts_unchecked_ms": unchecked_ms,
        "checks_ms": checks_ms,
        "speedup_render_prompts_vs_baseline": base_ms / checked_ms,
        "speedup_before_the_device_vs_baseline": base_ms / unchecked_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reps", type=int, default=25)
    args = parser.parse_args()

    from extract_gpu import long_workload

    from persona_geometry import builtin_personas, builtin_questions
    from persona_geometry.tiny import _train_tokenizer

    tokenizer = _train_tokenizer(4096)
    result: dict = {"machine": machine(), "tokenizer": "ChatML BPE of 4,096 tokens (benchmarks/extract_gpu.py's)"}
    workloads = {"builtin": (list(builtin_personas()), list(builtin_questions())), "long_prompts": long_workload(75, 20)}
    for name, (personas, questions) in workloads.items():
        reps = args.reps if name == "builtin" else max(3, args.reps // 5)
        result[name] = _measure(tokenizer, personas, questions, reps)
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in result[name].items()}, flush=True)
    result["notes"] = {
        "times": "median of --reps calls (a fifth as many on long_prompts), milliseconds",
        "checks_ms": "the checks alone, each on a fresh unchecked render",
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
