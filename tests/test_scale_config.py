"""Scale-out settings checked up front: persona blocks, shard strings, device_map and tensor parallelism."""

from __future__ import annotations

import pytest

from persona_geometry.distributed import block_of, local_only, rank, world_size
from persona_geometry.pipeline.config import EvalConfig, ModelConfig, ResponsesConfig, StudyConfig
from persona_geometry.pipeline.executors import parse_shard


@pytest.mark.parametrize("n_items,n_blocks", [(12, 5), (3, 8), (7, 1), (0, 2)])
def test_persona_blocks_are_contiguous_and_cover_everything_once(n_items, n_blocks):
    blocks = [block_of(n_items, n_blocks, i) for i in range(n_blocks)]
    assert [i for b in blocks for i in b] == list(range(n_items))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_local_only_hides_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert (world_size(), rank()) == (4, 2)
    with local_only():
        import os

        assert (world_size(), rank()) == (1, 0) and "LOCAL_RANK" not in os.environ
    assert (world_size(), rank()) == (4, 2)


def test_shard_strings():
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError, match="'shard' parameter"):
            parse_shard(bad)


def test_device_map_and_max_memory_are_checked_and_round_trip():
    m = ModelConfig(name="m", device_map="auto", max_memory={0: "70GiB", 1: "70GiB", "cpu": "200GiB"})
    assert m.placement() == {"device": None, "device_map": "auto", "max_memory": {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}, "offload_folder": None}
    assert ModelConfig.from_dict(m.to_dict()) == m
    assert ModelConfig(name="m").placement() == {"device": None}
    with pytest.raises(ValueError, match="'max_memory'"):
        ModelConfig(name="m", max_memory={0: "1GiB"})
    with pytest.raises(ValueError, match="'device_map'"):
        ModelConfig(name="m", device_map="everywhere")

    disk = {"model.layers.0": "cpu", "model.layers.1": "disk"}
    m = ModelConfig(name="m", device_map=disk, offload_folder="/scratch/offload")
    assert m.placement() == {"device": None, "device_map": disk, "max_memory": None, "offload_folder": "/scratch/offload"}
    assert ModelConfig.from_dict(m.to_dict()) == m
    for bad in ({"offload_folder": "/scratch/offload"}, {"device_map": "auto", "offload_folder": ""}, {"device_map": disk}):
        with pytest.raises(ValueError, match="'offload_folder' parameter of ModelConfig"):
            ModelConfig(name="m", **bad)


def test_tensor_parallel_size_needs_vllm():
    assert EvalConfig(backend="vllm", tensor_parallel_size=4).tensor_parallel_size == 4
    with pytest.raises(ValueError, match="'tensor_parallel_size'"):
        EvalConfig(backend="hf", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="'tensor_parallel_size'"):
        ResponsesConfig(backend="hf", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        StudyConfig.from_dict({"model": "m", "eval": {"backend": "vllm", "tensor_parallel_size": 0}})
