"""A run killed with SIGKILL and resumed ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gross import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[1] / "src"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")


def write_data(path: Path, n: int = 600, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    x = rng.integers(0, 200, size=(n, size, size, 3), dtype=np.uint8) + (y * 15).astype(np.uint8)[:, None, None, None]
    np.savez(path, x=x.astype(np.uint8), y=y)


def command(tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "gross.cli", "train", "-q", "--device", "cpu", "--runs", str(tmp), "--name", name,
        "--set", f"data.dataset={tmp / 'data.npz'}",
        "--set", "model.kwargs={widths: [4, 4, 8, 8]}",
        "--set", "train.epochs=8", "--set", "train.batch_size=32", "--set", "train.lr=0.05",
        *extra,
    ]


# Runs the CLI with two hooks: once the first epoch's checkpoint is written, the run trains one
# batch of the next epoch and stops itself (SIGSTOP), for the test to SIGKILL it there. The kill
# lands at the same step whatever the machine's load: no timer decides it.
STOP_IN_THE_SECOND_EPOCH = """
import os, runpy, signal, sys
import gross.train as train

saved = []
save_training_state = train.save_training_state
train_batches = train._train_batches


def save_and_mark(*args, **kwargs):
    save_training_state(*args, **kwargs)
    saved.append(True)


def stop_after_one_batch(*args, **kwargs):
    for i, batch in enumerate(train_batches(*args, **kwargs)):
        if saved and i == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        yield batch


train.save_training_state = save_and_mark
train._train_batches = stop_after_one_batch
sys.argv[0] = "gross"
runpy.run_module("gross.cli", run_name="__main__", alter_sys=True)
"""


def environment() -> dict:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    write_data(tmp_path / "data.npz")
    env = environment()
    full = subprocess.run(command(tmp_path, "full"), env=env, capture_output=True, text=True, timeout=120)
    assert full.returncode == 0, full.stderr

    base = tmp_path / "killed" / "base"
    (tmp_path / "stop.py").write_text(STOP_IN_THE_SECOND_EPOCH)
    stopping = [sys.executable, str(tmp_path / "stop.py"), *command(tmp_path, "killed")[3:]]
    proc = subprocess.Popen(stopping, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:  # wait for the run to stop itself; the step it stops at does not depend on this loop
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid:
            break
        assert time.monotonic() < deadline, "the run did not stop within 120 s"
        time.sleep(0.05)
    assert os.WIFSTOPPED(status), f"the run ended before it stopped: {proc.stderr.read().decode()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (base / "model.safetensors").exists()
    epoch = ckpt.read_meta(base / "checkpoint.safetensors")["epoch"]
    assert epoch == 1  # killed one batch into the second epoch
    assert [json.loads(line)["epoch"] for line in (base / "metrics.jsonl").read_text().splitlines()] == [1]

    again = subprocess.run(command(tmp_path, "killed"), env=env, capture_output=True, text=True, timeout=120)
    # No silent restart over an interrupted run: the user chooses.
    assert again.returncode == 1 and "pass --resume to continue it or --restart" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    resumed = subprocess.run(command(tmp_path, "killed", "--resume"), env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"[train] resuming from epoch {epoch} ({base / 'checkpoint.safetensors'})" in resumed.stderr

    a, _ = ckpt.load_tensors(tmp_path / "full" / "base" / "model.safetensors")
    b, _ = ckpt.load_tensors(base / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    epochs = [json.loads(line)["epoch"] for line in (base / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))
    assert not (base / "checkpoint.safetensors").exists()
