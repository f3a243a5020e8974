"""Follow-ups on cached activations: add a persona without recomputing the others, then project
every persona onto the assistant direction.

Run examples/centroids.py first (its header shows how, against the tiny model), then:

    python examples/follow_up.py

It reads runs/centroids/activations (PERSONA_GEOMETRY_ACTS) and loads the model those
activations were made with, as their manifest records it (PERSONA_GEOMETRY_MODEL overrides).
"""

import os

import persona_geometry as pg
from persona_geometry import probes

if __name__ == "__main__":
    acts = pg.ActivationSet.load(os.environ.get("PERSONA_GEOMETRY_ACTS", "runs/centroids/activations"))
    model = pg.load_model(os.environ.get("PERSONA_GEOMETRY_MODEL", acts.manifest["model_id"]), dtype="auto")
    pirate = pg.Persona(name="pirate", system_prompt="You are a pirate captain sailing the Caribbean.", category="character")
    # Only the pirate's 20 prompts run through the model; the cached personas are reused.
    acts = probes.extend(acts, model, personas=[pirate])
    cos = pg.cosine_to_reference(pg.center(pg.centroids(acts)), reference="helpful_assistant")
    print(cos.to_wide().loc[["helpful_assistant", "villain", "pirate"]].round(3).to_string())
    axis = probes.assistant_axis(acts, reference="helpful_assistant")  # unit direction per layer
    proj = probes.project(pg.centroids(acts), axis, centering="all")  # one value per persona and layer
    print(proj.to_frame().round(3).tail(len(acts.personas)).to_string(index=False))
