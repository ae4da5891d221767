"""Exact resume: a run killed with SIGKILL and restarted ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dinoflow.storage import Storage
from trainer.checkpoints import load_latest_checkpoint

ARGS = [
    "model.embed_dim=32", "model.depth=3", "model.num_heads=2", "model.drop_path_rate=0.2",
    "heads.num_prototypes=64", "heads.hidden_dim=64", "heads.bottleneck_dim=16",
    "optim.batch_size=16", "optim.epoch_length=10", "optim.epochs=4", "optim.warmup_epochs=1",
    "checkpoint_every=5", "eval.train_limit=300", "eval.test_limit=100", "seed=3",
]


def run(out: Path, wait: bool = True) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{out.parent / (out.name + '.db')}")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "pretrain", f"out={out}", *ARGS],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    if wait:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output.decode()[-3000:]
    return process


def final_state(out: Path) -> dict:
    return load_latest_checkpoint(Storage(), str(out))


def test_killed_run_resumes_exactly(tmp_path: Path) -> None:
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run(reference)

    process = run(interrupted, wait=False)
    pointer = interrupted / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while not (pointer.exists() and json.loads(pointer.read_text())["step"] >= 10):
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(pointer.read_text())["step"]
    assert killed_at < 40, "the run should have been killed before its end"
    run(interrupted)

    want, got = final_state(reference), final_state(interrupted)
    assert got["step"] == want["step"] == 40
    for part in ("student", "teacher", "objective"):
        for key, tensor in want[part].items():
            torch.testing.assert_close(got[part][key], tensor, rtol=0, atol=1e-6, msg=f"{part}.{key}")
    for key, value in want["optimizer"]["state"].items():
        for name, tensor in value.items():
            torch.testing.assert_close(got["optimizer"]["state"][key][name], tensor, rtol=0, atol=1e-6)
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["steps"] == 40 and (interrupted / "backbone.safetensors").exists()
