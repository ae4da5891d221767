"""``dinoflow pretrain --nproc N``: the command re-runs itself under torchrun with N ranks.

Real processes: the CLI starts ``torch.distributed.run``, whose 2 ranks meet over gloo on
127.0.0.1 and train a tiny model with FSDP2 on a folder of images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dinoflow.storage import Storage
from tests.trainer.test_distributed import ROOT, SMALL
from trainer.checkpoints import load_latest_checkpoint


def test_pretrain_nproc_2_trains_on_two_ranks_and_one_writes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(16):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(images / f"{index:02d}.png")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("RANK", None)
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "pretrain", "--nproc", "2", "--config", "tiny", *SMALL,
         "data.kind=folder", f"data.uri={images}", "optim.batch_size=2", "max_steps=2", "checkpoint_every=2",
         f"out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "--nproc_per_node 2" in done.stderr and "distributed.strategy=fsdp2" in done.stderr
    assert done.stdout.count('"images_seen"') == 1  # rank 0 alone reports
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["images_seen"]) == (2, 2 * 2 * 2)  # 2 steps x 2 ranks x 2 images
    assert load_latest_checkpoint(Storage(), str(out))["step"] == 2
    assert (out / "backbone.safetensors").exists()

    import mlflow

    runs = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()])
    assert len(runs) == 1  # one tracked run, not one per rank
