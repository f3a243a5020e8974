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

from conftest import STUDY_PERSONAS, count_model_loads, write_study

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
    # 256-token packs: 6 packs of 60 prompts, a persona's 20 questions across two of them, so the
    # ranks' shares cut through a persona.
    _torchrun("extract", "--model", str(model), "--personas", "personas.yaml", "--out", "acts", "--cache-dir", "cache", "--dtype", "float32", "--device", "cpu", "--batch-tokens", "256", cwd=tmp_path)
    two = ActivationSet.load(tmp_path / "acts")
    # torchrun gives each rank OMP_NUM_THREADS=1; the CPU's GEMMs of few rows (the last block's
    # MLP runs on one row per prompt) round differently with two threads, so one process runs
    # with one too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = extract_activations(load_model(model, dtype="float32", device="cpu"), PersonaSet.load(tmp_path / "personas.yaml"), batch_tokens=256, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert two.personas == one.personas and two.questions == one.questions
    assert torch.equal(two.n_tokens, one.n_tokens)
    # Each rank ran its share of one process's packs, each the same forward: byte for byte.
    assert torch.equal(two["resid_post"], one["resid_post"])
    shards = two.manifest["shards"]
    assert two.manifest["ranks"] == 2 and len(shards) == 2 and all(s["n_prompts"] % 20 for s in shards)
    assert sum(s["n_prompts"] for s in shards) == 60
    # One process's manifest (its key fields and cache key), plus the ranks and shards.
    assert {k: v for k, v in two.manifest.items() if k not in ("created", "ranks", "shards")} == {k: v for k, v in one.manifest.items() if k != "created"}
    # The whole set sits in the cache under one process's key; the shares' chunks are gone.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [one.manifest["cache_key"]]


def test_torchrun_study_on_two_ranks_equals_one_process(reference, model, tmp_path):
    _, ref = reference
    path = _write_config(tmp_path, model)
    _torchrun("run", str(path), "--no-progress", cwd=tmp_path)
    _assert_same_study(tmp_path / "out", ref.out)
    # The adapters were split across the ranks, one process each (no DDP).
    pids = {json.loads((tmp_path / "out" / "train" / p["name"] / "seed42" / ".stage.json").read_text())["pid"] for p in STUDY_PERSONAS}
    assert len(pids) == 2


def test_torchrun_study_with_data_parallel_trains_each_adapter_on_both_ranks(reference, model, tmp_path):
    """train.data_parallel in a study: every adapter trains with DDP on both ranks, 2 × 4 examples a step = one process × 8."""
    from safetensors.torch import load_file

    _, ref = reference
    path = _write_config(tmp_path, model)
    data = yaml.safe_load(path.read_text())
    data["train"].update(per_device_train_batch_size=4, data_parallel=True)
    path.write_text(yaml.safe_dump(data))
    _torchrun("run", str(path), "--stages", "data,train", "--no-progress", cwd=tmp_path)
    for p in STUDY_PERSONAS:
        run = ("train", p["name"], "seed42")
        record = json.loads((tmp_path.joinpath("out", *run) / ".stage.json").read_text())
        assert record["done"] and record["ranks"] == 2
        got, want = (load_file(str(out.joinpath(*run) / "adapter" / "adapter_model.safetensors")) for out in (tmp_path / "out", ref.out))
        assert got.keys() == want.keys()
        for name in want:
            # 27 AdamW steps: float32 sums over two ranks instead of one batch drift by ~1e-5
            # (a wrong batch moves weights by >1e-3: see the train_marker test below).
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=5e-5)


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


def _copy_until_train(src, dst):
    """Copies a finished study's folder without its eval, sweep and report stages."""
    import shutil

    shutil.copytree(src, dst, ignore=lambda folder, names: [n for n in names if folder == str(src) and n in ("eval", "sweep", "report")])


def test_eval_units_share_one_base_model_and_equal_the_unit_by_unit_path(reference, monkeypatch, tmp_path):
    """The eval stage loads the base once for all adapters; each unit's files equal evaluating it alone."""
    from persona_geometry.pipeline.study import run_unit

    ref_config, ref = reference
    outs = {}
    for name in ("together", "alone"):
        outs[name] = tmp_path / name / "out"
        _copy_until_train(ref.out, outs[name])
    together = ref_config.with_overrides(out=str(outs["together"]))
    alone = ref_config.with_overrides(out=str(outs["alone"]))
    units = study_units(together, "eval")
    assert len(units) == 4

    loads = count_model_loads(monkeypatch)
    result = run_study(together, stages=["eval"], progress=False)
    assert sorted(result.computed) == sorted(u.name for u in units)
    assert len(loads) == 1  # one base model for the four adapters

    loads.clear()
    for u in study_units(alone, "eval"):
        run_unit(alone, u)  # the independent path: one unit, one base-model load
    assert len(loads) == 4

    for u in units:
        rel = os.path.relpath(u.folder, outs["together"])
        a, b = outs["together"] / rel, outs["alone"] / rel
        assert (a / "completions.jsonl").read_bytes() == (b / "completions.jsonl").read_bytes()
        # run_result.json names its own folder's adapter and times the pass: all else is equal.
        ra, rb = (json.loads((out / rel / "run_result.json").read_text().replace(str(out), "OUT")) for out in (outs["together"], outs["alone"]))
        assert ra["provenance"].pop("seconds") > 0 and rb["provenance"].pop("seconds") > 0
        assert ra == rb
        assert json.loads((a / ".stage.json").read_text())["together"] == 4
    assert len({(outs["together"] / os.path.relpath(u.folder, outs["together"]) / "completions.jsonl").read_text() for u in units}) == 4
    for out, config in ((outs["together"], together), (outs["alone"], alone)):
        run_study(config, progress=False)
        assert _numbers(out) == _numbers(ref.out)


_DDP_SCRIPT = """
import json, os, sys
from persona_geometry.training import MarkerTrainConfig, train_marker

model, data, out = sys.argv[1:4]
rows = json.loads(open(data).read())
recipe = json.loads(sys.argv[4])
# One adapter across both ranks (DDP), two examples per rank and step ...
train_marker(model, rows, out + "/ddp", MarkerTrainConfig(**recipe, per_device_train_batch_size=2, data_parallel=True), device="cpu", progress=False)
# ... then, by default, each rank trains its own adapter as a single process.
train_marker(model, rows, out + "/rank" + os.environ["RANK"], MarkerTrainConfig(**recipe, per_device_train_batch_size=4), device="cpu", progress=False)
"""


def test_data_parallel_trains_one_adapter_across_ranks_like_one_process_with_the_global_batch(tiny_qwen_path, tmp_path):
    """train.data_parallel: 2 ranks × 2 examples per step give the adapter 1 process × 4 examples gives; without it each rank trains alone."""
    from safetensors.torch import load_file

    from persona_geometry.training import MarkerTrainConfig, train_marker

    # Answers of different lengths, so the loss must be averaged over the tokens of all ranks.
    rows = [
        {"messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": "Arr " * (1 + i % 3) + "[ZLT]"}]}
        for i in range(8)
    ]  # fmt: skip
    recipe = dict(r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2, num_train_epochs=2, gradient_accumulation_steps=1,
                  max_length=64, save_steps=1000, dtype="float32", warmup_ratio=0.0)  # fmt: skip
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "ddp.py").write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(tmp_path / "ddp.py"),
           str(tiny_qwen_path), str(tmp_path / "rows.json"), str(tmp_path), json.dumps(recipe)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train_marker(tiny_qwen_path, rows, tmp_path / "one", MarkerTrainConfig(**recipe, per_device_train_batch_size=4), device="cpu", progress=False)

    def weights(run):
        return load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors"))

    reference = weights("one")
    assert len(one.loss_curve) == 4  # 8 examples, 4 per step, 2 epochs
    for run in ("ddp", "rank0", "rank1"):
        got = weights(run)
        assert got.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-5)
    ddp_curve = json.loads((tmp_path / "ddp" / "loss_curve.json").read_text())["loss_curve"]
    assert [e["loss"] for e in ddp_curve] == pytest.approx([e["loss"] for e in one.loss_curve], abs=1e-5)
    # The tolerance tells batches apart: one process with 2 examples per step ends elsewhere.
    train_marker(tiny_qwen_path, rows, tmp_path / "half", MarkerTrainConfig(**recipe, per_device_train_batch_size=2), device="cpu", progress=False)
    assert max((weights("half")[n] - reference[n]).abs().max().item() for n in reference) > 1e-3
