"""Per-layer persona centroids and their centered cosine to the assistant, from Python.

    python examples/centroids.py                      # Qwen2.5-7B-Instruct from the local HF cache
    PERSONA_GEOMETRY_MODEL=path/to/model python examples/centroids.py

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
