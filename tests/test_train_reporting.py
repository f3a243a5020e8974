"""Training reports its loss to TensorBoard when asked (train.report_to), and loss_curve.json stays."""

from __future__ import annotations

import json
import struct

import pytest

from persona_geometry.training import MarkerTrainConfig, train_marker

from conftest import marker_rows

pytestmark = pytest.mark.slow


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Reads every scalar of the TFRecord event files under ``folder``, without TensorBoard's reader."""
    from tensorboardX.proto import event_pb2

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            record = data[at + 12 : at + 12 + length]  # after the length and its CRC
            at += 12 + length + 4  # and the record's CRC
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_tensorboard_gets_the_loss_curve(tiny_qwen_path, tmp_path):
    pytest.importorskip("tensorboardX")
    config = MarkerTrainConfig(r=4, lora_alpha=8, learning_rate=1e-3, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=1, save_steps=100, report_to="tensorboard")
    out = tmp_path / "run"
    train_marker(tiny_qwen_path, marker_rows(4), out, config, progress=False)
    curve = json.loads((out / "loss_curve.json").read_text())["loss_curve"]
    logged = _scalars(out / "logs")["train/loss"]
    assert [s for s, _ in logged] == [e["step"] for e in curve] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([e["loss"] for e in curve], rel=1e-6)  # float32 in the event file


def test_reporting_is_off_by_default_and_a_missing_tracker_names_the_extra(tiny_qwen_path, tmp_path, monkeypatch):
    assert MarkerTrainConfig().report_to == "none"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"persona-geometry\[wandb\]"):
        train_marker(tiny_qwen_path, marker_rows(4), tmp_path / "w", MarkerTrainConfig(max_steps=1, report_to="wandb"), progress=False)
    assert not (tmp_path / "w").exists()  # refused before anything was written
