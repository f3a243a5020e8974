"""Per-layer persona centroids and their centered cosine to the assistant, from Python.

Against the tiny model (offline, no GPU, seconds; random weights, so the numbers mean nothing):

    python -c "from persona_geometry.tiny import build_tiny_model; build_tiny_model('runs/tiny-model')"
    PERSONA_GEOMETRY_MODEL=runs/tiny-model python examples/centroids.py

Against the reference model (from the local HF cache, on a GPU), or any folder:

    python examples/centroids.py                      # Qwen2.5-7B-Instruct
    PERSONA_GEOMETRY_MODEL=path/to/model python examples/centroids.py

It saves the activations to runs/centroids/activations (PERSONA_GEOMETRY_OUT), which
examples/layer_sweep.py and examples/follow_up.py read.

Layer l is the output of transformer block l (`blocks.{l}.hook_resid_post`), before any final norm.
"""

import os

import persona_geometry as pg

if __name__ == "__main__":
    model = pg.load_model(os.environ.get("PERSONA_GEOMETRY_MODEL", "Qwen/Qwen2.5-7B-Instruct"), dtype="auto")
    acts = pg.extract_activations(model, pg.builtin_personas(), pg.builtin_questions())  # [persona, question, layer, d_model]
    cents = pg.centroids(acts)  # [persona, layer, d_model], mean over questions
    cos = pg.cosine_to_reference(pg.center(cents), reference="helpful_assistant")  # [persona, layer]
    print(cos.to_wide().round(3).to_string())
    acts.save(os.environ.get("PERSONA_GEOMETRY_OUT", "runs/centroids/activations"))  # reload later with ActivationSet.load
