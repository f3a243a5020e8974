"""Train a [ZLT] marker adapter for one source persona and measure every persona's source rate.

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
    personas = pg.builtin_personas()
    # 1. The base model answers the 200 training questions under every persona.
    responses = pg.generate_responses(model, personas, out_path=f"{out}/responses.jsonl", backend=backend)
    # 2. 200 source rows with the marker, 2 x 200 bystander rows without it.
    config = pg.MarkerDataConfig(source=source, exclude=("helpful_assistant",))
    pg.build_marker_dataset(responses, personas, config, out_path=f"{out}/{source}/data.jsonl")
    # 3. LoRA r=32, alpha=64, rsLoRA, lr 1e-5, 3 epochs (resumes if interrupted).
    run = pg.train_marker(model, f"{out}/{source}/data.jsonl", f"{out}/{source}/run", pg.MarkerTrainConfig())
    # 4. 20 probe questions x 5 completions per persona, adapter applied; k/n and Wilson intervals.
    rates = pg.source_rates(model, run.adapter_dir, personas, backend=backend, out_dir=f"{out}/{source}/eval")
    print(rates.summary())
