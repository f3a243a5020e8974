"""Shared-prefix extraction gives the activations of full prompts (float32), and prefixes are found right."""

import pytest
import torch

from persona_geometry import builtin_personas, builtin_questions, extract_activations, load_model
from persona_geometry.prefix_cache import shared_prefixes


def test_prefixes_are_common_per_group_and_leave_a_token_to_compute():
    groups = [
        [(1, 2, 3, 4, 5), (1, 2, 3, 9)],  # shares (1, 2, 3)
        [(7, 8), (7, 8, 1)],  # capped at len(shortest) - 1: (7,)... too short, so no prefix
        [(4, 4, 4, 4)],  # one prompt alone shares nothing
    ]
    shared = shared_prefixes(groups)
    assert shared.prefixes == ((1, 2, 3), ())
    assert shared.of_prompt[(1, 2, 3, 9)] == 0 and shared.of_prompt[(7, 8, 1)] == 1 and shared.of_prompt[(4, 4, 4, 4)] == 1
    assert shared.saved_tokens == 3
    assert shared_prefixes([[(1, 2)], [(3, 4)]]) is None


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_shared_prefix_matches_full_prompts(family, request):
    path = request.getfixturevalue(f"tiny_{family}_path")
    handle = load_model(str(path), dtype="float32")
    personas, questions = builtin_personas()[:5], builtin_questions()[:7]
    full = extract_activations(handle, personas, questions, hooks=("resid_post", "resid_pre"), share_prefix=False, progress=False)
    shared = extract_activations(handle, personas, questions, hooks=("resid_post", "resid_pre"), progress=False)
    assert shared.manifest["share_prefix"] and not full.manifest["share_prefix"]
    for hook in ("resid_post", "resid_pre"):
        assert (shared[hook] - full[hook]).abs().max().item() <= 1e-5
    # A small budget forces several prefix batches and mixes personas within suffix batches.
    small = extract_activations(handle, personas, questions, batch_tokens=96, layers=[0, 1], progress=False)
    torch.testing.assert_close(small["resid_post"], full["resid_post"][:, :, :2], atol=1e-5, rtol=0)


def test_one_question_per_persona_runs_without_sharing(tiny_qwen_path):
    handle = load_model(str(tiny_qwen_path), dtype="float32")
    acts = extract_activations(handle, builtin_personas()[:3], builtin_questions()[:1], progress=False)
    assert not acts.manifest["share_prefix"]


def test_resid_pre_alone_stops_before_the_block_and_still_matches(tiny_qwen_path):
    handle = load_model(str(tiny_qwen_path), dtype="float32")
    personas, questions = builtin_personas()[:3], builtin_questions()[:4]
    full = extract_activations(handle, personas, questions, hooks="resid_pre", layers=[2], share_prefix=False, progress=False)
    shared = extract_activations(handle, personas, questions, hooks="resid_pre", layers=[2], progress=False)
    assert shared.manifest["share_prefix"]
    torch.testing.assert_close(shared["resid_pre"], full["resid_pre"], atol=1e-5, rtol=0)
