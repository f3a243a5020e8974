"""The CLI under real faults: a read-only mount, a full disk, a closed pipe, a CUDA device that is
not there. Each ends in one line on stderr and exit status 2 (a closed pipe: quietly), nothing
half-written left behind.

Read-only and full file systems are real tmpfs mounts. We run as root, and a read-only folder
(chmod) does not stop root, so those tests need to mount; where mounting is not allowed they skip
and say why.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from persona_geometry import builtin_personas, builtin_questions
from persona_geometry.pipeline.cli import main


def _mount(tmp_path, options: str):
    point = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); chmod does not stop root")
    return point


@pytest.fixture
def mounts(tmp_path):
    made = []

    def make(options: str):
        point = _mount(tmp_path, options)
        made.append(point)
        return point

    yield make
    for point in made:
        subprocess.run(["umount", str(point)], check=False)


@pytest.fixture
def inputs(tmp_path):
    builtin_personas().select(["helpful_assistant", "villain", "librarian"]).save(tmp_path / "personas.yaml")
    (tmp_path / "questions.txt").write_text("\n".join(builtin_questions()[:4]) + "\n")
    rows = ["persona,cos,k,n"] + [f"p{i},{0.1 * i - 0.3},{i + 1},10" for i in range(6)]
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_extract_into_a_read_only_mount_fails_in_one_line_before_loading(mounts, inputs, capsys):
    ro = mounts("ro,size=1m")
    status = main(["extract", "--model", str(inputs / "no-model"), "--out", str(ro / "acts"), "--device", "cpu"])
    line = _one_line(capsys)
    assert status == 2 and str(ro / "acts") in line and "read-only" in line


def test_analyze_into_a_read_only_mount_fails_in_one_line(mounts, inputs, capsys):
    ro = mounts("ro,size=1m")
    status = main(["analyze", str(inputs / "table.csv"), "--x", "cos", "--k", "k", "--n", "n", "--json", str(ro / "r.json")])
    line = _one_line(capsys)
    assert status == 2 and "r.json" in line


def test_extract_onto_a_full_disk_fails_in_one_line_and_leaves_no_temporary_files(tiny_qwen_path, mounts, inputs, capsys):
    small = mounts("size=16k")  # the set (3 personas x 4 questions x 4 layers x 128 floats = 24 KiB) does not fit
    status = main([
        "extract", "--model", str(tiny_qwen_path), "--personas", str(inputs / "personas.yaml"),
        "--questions", str(inputs / "questions.txt"), "--device", "cpu", "--dtype", "float32",
        "--out", str(small / "acts"),
    ])  # fmt: skip
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("persona-geometry")]  # progress bars aside
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0]
    assert list(small.iterdir()) == []  # no temporary folder, no half-written set


def test_a_closed_pipe_ends_quietly(inputs):
    """``analyze ... | head -1``: the reader goes away; no traceback, no error line."""
    cmd = f"{sys.executable} -m persona_geometry.pipeline.cli analyze {inputs / 'table.csv'} --x cos --k k --n n | head -c 1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    assert "Traceback" not in done.stderr and done.stderr.strip() == "", done.stderr


def test_device_cuda_without_cuda_is_one_line_naming_device(tiny_qwen_path, inputs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    cmd = [sys.executable, "-m", "persona_geometry.pipeline.cli", "extract", "--model", str(tiny_qwen_path), "--device", "cuda",
           "--out", str(inputs / "acts")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "device" in err[0] and "cuda" in err[0]
    assert not (inputs / "acts").exists()
