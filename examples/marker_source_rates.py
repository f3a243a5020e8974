"""Train a [ZLT] marker adapter for one source persona and measure every persona's source rate.

Against the tiny model (offline, no GPU, about a minute; random weights, so the rates mean nothing):

    python -c "from persona_geometry.tiny import build_tiny_model; build_tiny_model('runs/tiny-model')"
    PERSONA_GEOMETRY_MODEL=runs/tiny-model PERSONA_GEOMETRY_BACKEND=hf PERSONA_GEOMETRY_QUICK=1 python examples/marker_source_rates.py

PERSONA_GEOMETRY_QUICK=1 shrinks every stage (a few questions, short answers, a few steps); CI
runs it that way. The reference recipe, on a GPU:

    python examples/marker_source_rates.py            # Qwen2.5-7B-Instruct, vLLM, the study's recipe
    PERSONA_GEOMETRY_MODEL=path/to/model PERSONA_GEOMETRY_BACKEND=hf python examples/marker_source_rates.py

The `if __name__ == "__main__":` guard matters: vLLM may start worker processes that re-import
this file.
"""

import os

import persona_geometry as pg

if __name__ == "__main__":
    model = os.environ.get("PERSONA_GEOMETRY_MODEL", "Qwen/Qwen2.5-7B-Instruct")
    backend = os.environ.get("PERSONA_GEOMETRY_BACKEND", "vllm")
    out = os.environ.get("PERSONA_GEOMETRY_OUT", "runs/marker")
    source = os.environ.get("PERSONA_GEOMETRY_SOURCE", "villain")
    quick = os.environ.get("PERSONA_GEOMETRY_QUICK") == "1"
    personas = pg.builtin_personas()
    train_q = pg.training_questions()[:8] if quick else pg.training_questions()
    # 1. The base model answers the 200 training questions under every persona.
    responses = pg.generate_responses(
        model, personas, train_q, out_path=f"{out}/responses.jsonl", backend=backend, max_new_tokens=8 if quick else 512
    )
    # 2. 200 source rows with the marker, 2 x 200 bystander rows without it.
    n = 8 if quick else 200
    config = pg.MarkerDataConfig(source=source, exclude=("helpful_assistant",), n_source=n, n_per_bystander=n)
    pg.build_marker_dataset(responses, personas, config, out_path=f"{out}/{source}/data.jsonl")
    # 3. LoRA r=32, alpha=64, rsLoRA, lr 1e-5, 3 epochs (resumes if interrupted).
    recipe = pg.MarkerTrainConfig(max_steps=2, max_length=128) if quick else pg.MarkerTrainConfig()
    run = pg.train_marker(model, f"{out}/{source}/data.jsonl", f"{out}/{source}/run", recipe)
    # 4. 20 probe questions x 5 completions per persona, adapter applied; k/n and Wilson intervals.
    rates = pg.source_rates(
        model,
        run.adapter_dir,
        personas,
        pg.builtin_questions()[:2] if quick else None,
        n_completions=1 if quick else 5,
        max_new_tokens=8 if quick else 512,
        backend=backend,
        out_dir=f"{out}/{source}/eval",
    )
    print(rates.summary())
