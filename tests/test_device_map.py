"""A model split by accelerate's ``device_map`` (blocks offloaded to disk) extracts what the unsplit model does."""

from __future__ import annotations

import pytest
import torch

from persona_geometry.extract import extract_activations
from persona_geometry.models import load_model
from persona_geometry.personas import builtin_personas

QUESTIONS = ["Why is the sky blue?", "How do I boil an egg?", "What makes a good friend?"]


def _split_map(n_layers: int) -> dict[str, str]:
    # Every other block on disk: accelerate loads each one onto the CPU only for its forward.
    blocks = {f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(n_layers)}
    return {"model.embed_tokens": "cpu", **blocks, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("share_prefix", [True, False])
def test_blocks_offloaded_to_disk_give_the_unsplit_activations(tiny_qwen_path, tmp_path, share_prefix):
    personas = builtin_personas()[:3]
    plain = load_model(tiny_qwen_path, device="cpu", dtype="float32")
    n_layers = plain.model.config.num_hidden_layers
    split = load_model(tiny_qwen_path, dtype="float32", device_map=_split_map(n_layers), offload_folder=tmp_path / "offload")
    # The split really is split: accelerate recorded the map and left the disk blocks' weights off the CPU.
    assert set(split.model.hf_device_map.values()) == {"cpu", "disk"}
    assert split.device == torch.device("cpu")
    kw = dict(hooks=["resid_post", "resid_pre"], share_prefix=share_prefix, progress=False)
    a = extract_activations(split, personas, QUESTIONS, **kw)
    b = extract_activations(plain, personas, QUESTIONS, **kw)
    for hook in b.hooks:
        torch.testing.assert_close(a[hook], b[hook], rtol=0, atol=1e-6)


def test_device_map_settings_are_checked(tiny_qwen_path):
    with pytest.raises(ValueError, match="'device_map' parameter of load_model"):
        load_model(tiny_qwen_path, max_memory={"cpu": "1GiB"})


def test_a_split_model_packs_with_a_dense_mask(tiny_qwen_path, tmp_path):
    """A BlockMask is no tensor, so accelerate cannot move it between the devices of a split model."""
    from persona_geometry.packing import packed_path

    plain = load_model(tiny_qwen_path, device="cpu", dtype="float32")
    n_layers = plain.model.config.num_hidden_layers
    split = load_model(tiny_qwen_path, dtype="float32", device_map=_split_map(n_layers), offload_folder=tmp_path / "offload")
    gpu = torch.device("cuda")  # only the choice is asked for: nothing runs there
    assert packed_path(plain.model, gpu) == "packed_flex"
    assert packed_path(split.model, gpu) == "packed_sdpa"
