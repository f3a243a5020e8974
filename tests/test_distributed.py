"""Extraction across torchrun ranks: the share planning, and byte-identity with one process on every path.

``balanced_shares`` is checked against its contract (each unit once, within one unit's cost of
an equal split) and against an exhaustive search of all splits (at most 4/3 of the best). The two-rank
runs (gloo, CPU, float32) compare with an in-process ``extract_activations`` of the same
settings, byte for byte, on the packed, prefix-cache, padded and TransformerLens paths, and
check that an interrupted run resumes each rank's share from its chunks.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from persona_geometry.distributed import balanced_shares

from conftest import STUDY_PERSONAS, ForwardCounter


def _check_shares(costs, n):
    shares = balanced_shares(costs, n)
    assert len(shares) == n
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))  # each unit once
    assert all(s == sorted(s) for s in shares)  # in plan order within a share
    return shares


@pytest.mark.parametrize("seed", range(20))
def test_shares_cover_every_unit_once_and_balance_tokens(seed):
    rng = random.Random(seed)
    costs = [rng.randint(1, 400) for _ in range(rng.randint(1, 60))]
    for n in (1, 2, 3, 8):
        shares = _check_shares(costs, n)
        sums = [sum(costs[i] for i in s) for s in shares]
        # No share over an equal split by more than one unit ...
        assert max(sums) <= sum(costs) / n + max(costs)
        # ... nor over 4/3 of the best split of all (exhaustive search on small cases).
        if n ** len(costs) <= 60_000:
            best = min(
                max(sum(c for c, k in zip(costs, owner, strict=True) if k == j) for j in range(n))
                for owner in itertools.product(range(n), repeat=len(costs))
            )
            assert max(sums) <= 4 / 3 * best
        assert balanced_shares(list(costs), n) == shares  # deterministic


def test_shares_of_a_few_large_packs_balance_better_than_contiguous_runs():
    # 21 packs of one chunk plan, uneven: the best contiguous split leaves 7% between the ranks.
    costs = [9300] * 10 + [6000, 9300, 9300, 4000] + [9300] * 6 + [2000]
    a, b = _check_shares(costs, 2)
    gap = abs(sum(costs[i] for i in a) - sum(costs[i] for i in b))
    contiguous = min(abs(sum(costs[:k]) - sum(costs[k:])) for k in range(len(costs) + 1))
    assert gap <= 2000 < contiguous


def test_shares_edge_cases():
    assert _check_shares([], 3) == [[], [], []]
    assert _check_shares([5], 2) == [[0], []]  # a tie goes to the lower share
    assert _check_shares([1, 1], 4) == [[0], [1], [], []]
    assert _check_shares([0, 0, 0], 2)  # zero costs still cover everything once
    for bad in (0, -1):
        with pytest.raises(ValueError, match="'n_shares' parameter of balanced_shares"):
            balanced_shares([1, 2], bad)
    with pytest.raises(ValueError, match="'costs' parameter of balanced_shares"):
        balanced_shares([1, -2], 2)


_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[4])
import torch
from conftest import ForwardCounter
from persona_geometry import distributed
from persona_geometry.extract import extract_activations
from persona_geometry.models import load_model
from persona_geometry.personas import PersonaSet

model, personas, out = sys.argv[1], PersonaSet.from_list(json.loads(sys.argv[2])), sys.argv[3]
rank = int(os.environ["RANK"])
handle = load_model(model, dtype="float32", device="cpu")
kw = dict(batch_tokens=256, chunk_prompts=8, cache_dir=out + "/cache", progress=False)
record = {}
# Interrupted at each rank's second forward: its first chunk (one pack) is on disk.
with ForwardCounter(handle, fail_on=2):
    try:
        extract_activations(handle, personas, **kw)
    except KeyboardInterrupt:
        pass
distributed.barrier()  # both ranks' chunks are on disk
record["partial_chunks"] = sorted(str(p.relative_to(out)) for p in __import__("pathlib").Path(out, "cache").glob("*.partial/chunk-*"))
with ForwardCounter(handle) as c:
    acts = extract_activations(handle, personas, **kw)  # resumes
record["resumed_forwards"] = c.calls
with ForwardCounter(handle) as c:
    again = extract_activations(handle, personas, **kw)  # cached
record["cached_forwards"] = c.calls
record["cached_equal"] = all(torch.equal(again[h], acts[h]) for h in acts.hooks)
if rank == 0:
    acts.save(out + "/packed")
# The padded fallbacks and TransformerLens, sharded by one process's batches.
for name, extra in (("prefix_cache", dict(pack=False)), ("padded", dict(pack=False, share_prefix=False)),
                    ("transformer_lens", dict(engine="transformer_lens"))):
    got = extract_activations(handle, personas, batch_tokens=256, progress=False, **extra)
    if rank == 0:
        got.save(out + "/" + name)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(record, f)
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_resume_their_shares_and_equal_one_process_on_every_path(tiny_qwen_path, tmp_path):
    pytest.importorskip("transformer_lens")
    from persona_geometry.activations import ActivationSet
    from persona_geometry.extract import extract_activations
    from persona_geometry.models import load_model
    from persona_geometry.personas import PersonaSet

    rows = STUDY_PERSONAS[:3]
    (tmp_path / "run.py").write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(tmp_path / "run.py"),
           str(tiny_qwen_path), json.dumps(rows), str(tmp_path), str(Path(__file__).parent)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    handle = load_model(tiny_qwen_path, dtype="float32", device="cpu")
    personas = PersonaSet.from_list(rows)
    with ForwardCounter(handle) as c:
        one = extract_activations(handle, personas, batch_tokens=256, chunk_prompts=8, progress=False)
    two = ActivationSet.load(tmp_path / "packed")
    assert torch.equal(two["resid_post"], one["resid_post"]) and two.manifest["cache_key"] == one.manifest["cache_key"]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank kept the chunk it finished before the interruption and computed only the rest.
    assert all(len(r["partial_chunks"]) == 2 for r in ranks)
    assert sum(r["resumed_forwards"] for r in ranks) == c.calls - 2
    assert all(r["cached_forwards"] == 0 and r["cached_equal"] for r in ranks)
    # The whole set is one process's cache entry: a single process loads it without a forward.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [one.manifest["cache_key"]]
    with ForwardCounter(handle) as c:
        cached = extract_activations(handle, personas, batch_tokens=256, chunk_prompts=8, cache_dir=tmp_path / "cache", progress=False)
    assert c.calls == 0 and torch.equal(cached["resid_post"], one["resid_post"])

    for name, extra in (("prefix_cache", dict(pack=False)), ("padded", dict(pack=False, share_prefix=False)),
                        ("transformer_lens", dict(engine="transformer_lens"))):  # fmt: skip
        ref = extract_activations(handle, personas, batch_tokens=256, progress=False, **extra)
        got = ActivationSet.load(tmp_path / name)
        assert got.manifest["forward"] == ref.manifest["forward"] == name
        assert got.manifest["shards"][0]["n_prompts"] and got.manifest["shards"][1]["n_prompts"]  # both ranks worked
        assert torch.equal(got["resid_post"], ref["resid_post"]), name
