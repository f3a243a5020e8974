"""A study run by units on other executors (array shards, torchrun ranks, Ray tasks) equals one process.

One in-process run of a small study is the reference (module fixture); each executor's run of
the same config must give byte-identical activations and a report.json with the same numbers,
and a unit already finished is never computed again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from persona_geometry.pipeline.config import StudyConfig
from persona_geometry.pipeline.study import _extracted, run_study, study_units

from conftest import STUDY_PERSONAS, write_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tiny_qwen256_path):
    return tiny_qwen256_path


def _write_config(folder, model):
    """Writes a small study (4 personas × 4 questions, 4 adapters) and returns its YAML path."""
    return write_study(folder, model, name="executor study", analysis={"n_permutations": 100, "n_bootstrap": 20})


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The in-process run every other executor is compared with."""
    path = _write_config(tmp_path_factory.mktemp("reference"), model)
    config = StudyConfig.load(path)
    result = run_study(config, progress=False)
    return config, result


def _numbers(out):
    """Returns report.json without its provenance (which names the output folder)."""
    report = json.loads((out / "report" / "report.json").read_text())
    report.pop("provenance")
    return report


def _assert_same_study(out, reference_out):
    a, b = _extracted(out, "activations"), _extracted(reference_out, "activations")
    for hook in b.hooks:
        assert torch.equal(a[hook], b[hook])  # byte for byte, float32
    assert _numbers(out) == _numbers(reference_out)
    assert (out / "sweep" / "sweep.csv").read_text() == (reference_out / "sweep" / "sweep.csv").read_text()


def test_array_shards_then_a_plain_run_equal_one_run_and_recompute_nothing(reference, model, tmp_path):
    ref_config, ref = reference
    config = StudyConfig.load(_write_config(tmp_path, model))
    first = run_study(config, shard="0/2", progress=False)
    second = run_study(config, shard="1/2", progress=False)
    assert "report" not in first.ran and not (tmp_path / "out" / "report").exists()
    train = [u.name for u in study_units(config, "train")]
    # Shard i takes units i::2; the single data unit is computed once, by the first shard.
    assert [n for n in first.computed if n.startswith("train/")] == train[0::2]
    assert [n for n in second.computed if n.startswith("train/")] == train[1::2]
    assert "data" in first.computed and "data" not in second.computed
    final = run_study(config, progress=False)
    assert final.computed == ()
    assert set(final.ran) == {"extract", "data", "train", "eval", "sweep", "report"}
    _assert_same_study(tmp_path / "out", ref.out)
    # Each unit logs where it ran, next to its output.
    log_text = (tmp_path / "out" / "train" / "villain" / "seed42" / "unit.log").read_text()
    assert "unit train/villain/seed42: running on" in log_text


def test_a_bad_shard_is_one_line_error(reference, tmp_path):
    config, _ = reference
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="'shard' parameter"):
            run_study(config.with_overrides(out=str(tmp_path)), shard=bad, progress=False)


def _torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "persona_geometry.pipeline.cli", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_extract_on_two_ranks_equals_one_process(model, tmp_path):
    from persona_geometry.activations import ActivationSet
    from persona_geometry.extract import extract_activations
    from persona_geometry.models import load_model
    from persona_geometry.personas import PersonaSet

    (tmp_path / "personas.yaml").write_text(yaml.safe_dump({"personas": STUDY_PERSONAS[:3]}))
    _torchrun("extract", "--model", str(model), "--personas", "personas.yaml", "--out", "acts", "--cache-dir", "cache", "--dtype", "float32", "--device", "cpu", cwd=tmp_path)
    two = ActivationSet.load(tmp_path / "acts")
    assert two.manifest["ranks"] == 2 and len(two.manifest["shards"]) == 2
    one = extract_activations(load_model(model, dtype="float32", device="cpu"), PersonaSet.load(tmp_path / "personas.yaml"), progress=False)
    assert two.personas == one.personas and two.questions == one.questions
    assert torch.equal(two.n_tokens, one.n_tokens)
    # Each rank batches only its own personas, so kernels see other batch shapes: float32
    # rounding, within the engine's documented batching tolerance.
    torch.testing.assert_close(two["resid_post"], one["resid_post"], rtol=0, atol=1e-5)
    # Every rank's block sits in the cache under its own key.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")) == sorted(two.manifest["shards"])


def test_torchrun_study_on_two_ranks_equals_one_process(reference, model, tmp_path):
    _, ref = reference
    path = _write_config(tmp_path, model)
    _torchrun("run", str(path), "--no-progress", cwd=tmp_path)
    _assert_same_study(tmp_path / "out", ref.out)
    # The adapters were split across the ranks, one process each (no DDP).
    pids = {json.loads((tmp_path / "out" / "train" / p["name"] / "seed42" / ".stage.json").read_text())["pid"] for p in STUDY_PERSONAS}
    assert len(pids) == 2


def test_ray_tasks_retry_a_killed_worker_and_equal_one_process(reference, model, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _, ref = reference
    config = StudyConfig.load(_write_config(tmp_path, model))
    # GPU counts are labels here: each unit asks for one of two "GPUs", so two run at once.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        target = tmp_path / "out" / "train" / "villain" / "seed42" / ".stage.json"
        killed = {}

        def kill_mid_unit():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not killed:
                try:
                    state = json.loads(target.read_text())
                except (OSError, ValueError):
                    time.sleep(0.05)
                    continue
                if not state["done"]:
                    os.kill(state["pid"], 9)
                    killed["pid"] = state["pid"]
                time.sleep(0.05)

        killer = threading.Thread(target=kill_mid_unit)
        killer.start()
        result = run_study(config, executor="ray", progress=False)
        killer.join()
    finally:
        ray.shutdown()
    assert killed, "the train unit never started"
    state = json.loads(target.read_text())
    assert state["done"] and state["attempt"] == 2 and state["pid"] != killed["pid"]
    assert "train/villain/seed42" in result.computed
    _assert_same_study(tmp_path / "out", ref.out)


def test_ray_executor_without_ray_names_the_extra(reference, tmp_path, monkeypatch):
    config, _ = reference
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"persona-geometry\[ray\]"):
        run_study(config.with_overrides(out=str(tmp_path)), executor="ray", progress=False)
