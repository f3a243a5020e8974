"""ActivationSet honours the Mapping contract and accepts full TransformerLens hook names."""

from __future__ import annotations

import pytest
import torch

from persona_geometry.activations import ActivationSet
from persona_geometry.personas import Persona, PersonaSet


def _acts() -> tuple[ActivationSet, torch.Tensor]:
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    acts = ActivationSet(
        {"resid_post": x},
        personas=PersonaSet(Persona(name=f"p{i}", system_prompt=f"You are p{i}.") for i in range(2)),
        questions=["q0?", "q1?", "q2?"],
        layers=[3, 7],
        n_tokens=torch.full((2, 3), 5),
    )
    return acts, x


def test_membership_and_get_follow_the_mapping_contract():
    acts, x = _acts()
    assert "resid_post" in acts and "resid_pre" not in acts and 3 not in acts
    assert acts.get("resid_pre") is None and acts.get("resid_pre", "absent") == "absent"
    assert acts.get("resid_post") is x and list(acts) == ["resid_post"] and dict(acts) == {"resid_post": x}
    with pytest.raises(KeyError, match="'hook' parameter of ActivationSet.__getitem__"):
        acts["resid_pre"]
    with pytest.raises(ValueError, match="must be one of the stored hooks"):  # also a ValueError, as bad input
        acts["resid_pre"]


def test_full_transformer_lens_names_give_one_block():
    acts, x = _acts()
    # Block 7 is the second stored layer: the same values as indexing the layer axis by hand.
    assert torch.equal(acts["blocks.7.hook_resid_post"], x[:, :, 1])
    assert torch.equal(acts.get("blocks.3.hook_resid_post"), x[:, :, 0])
    assert "blocks.3.hook_resid_post" in acts
    assert "blocks.5.hook_resid_post" not in acts  # a layer that was not stored
    assert "blocks.3.hook_resid_pre" not in acts  # a hook that was not captured
    assert acts.get("blocks.5.hook_resid_post") is None
    assert len(acts) == 1  # iteration stays over the stored hook points
