"""Faults during training: a process killed while it writes a checkpoint, and a non-finite loss.

Both must leave the previous checkpoint as the one a resume finds, and nothing half-written visible.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dinoflow.storage import Storage, join_uri
from tests.reliability.helpers import RandomImages, tiny_config
from trainer import engine
from trainer.checkpoints import load_latest_checkpoint
from trainer.data.datasets import collate_samples
from trainer.engine import pretrain

# The child writes checkpoint 1 whole, then checkpoint 2 through a Storage whose write of the
# chosen object stalls after its first chunk (6 MiB: on S3 one multipart part is already
# uploaded); the parent kills it there with SIGKILL.
CHILD = textwrap.dedent("""
    import io, os, sys, time
    import torch
    from dinoflow.storage import RetryPolicy, S3Settings, Storage
    from trainer.engine import save_checkpoint

    out, sentinel, stall_on = sys.argv[1], sys.argv[2], sys.argv[3]
    s3 = S3Settings.from_env(os.environ) if out.startswith("s3://") else None
    storage = Storage(s3, RetryPolicy(attempts=1), part_size=5 << 20)

    def checkpoint(step):
        buffer = io.BytesIO()
        torch.save({"step": step, "weights": torch.full((3 << 20,), float(step))}, buffer)  # 12 MiB
        return buffer.getvalue()

    save_checkpoint(storage, out, checkpoint(1), 1)
    plain_write = Storage.write_bytes

    def stalling_write(self, uri, data):
        if not uri.endswith(stall_on):
            return plain_write(self, uri, data)
        def chunks():
            yield data[: 6 << 20]
            open(sentinel, "w").close()
            time.sleep(120)
            yield data[6 << 20 :]
        self.write_stream(uri, chunks)

    Storage.write_bytes = stalling_write
    save_checkpoint(storage, out, checkpoint(2), 2)
    sys.exit("the write should have been killed")
""")


def kill_mid_write(out: str, stall_on: str, sentinel: Path, storage: Storage) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if storage.s3.endpoint_url:
        env.update(AWS_ENDPOINT_URL=storage.s3.endpoint_url, AWS_ACCESS_KEY_ID=storage.s3.access_key or "",
                   AWS_SECRET_ACCESS_KEY=storage.s3.secret_key or "")
    process = subprocess.Popen([sys.executable, "-c", CHILD, out, str(sentinel), stall_on], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not sentinel.exists():
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the stalled write"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stall_on", [".pt", "latest.json"], ids=["during-checkpoint", "during-pointer"])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(
    storage_root: tuple[Storage, str], tmp_path: Path, stall_on: str
) -> None:
    storage, root = storage_root
    out = join_uri(root, "run")
    kill_mid_write(out, stall_on, tmp_path / "stalled", storage)

    checkpoint = load_latest_checkpoint(storage, out)
    assert checkpoint is not None and checkpoint["step"] == 1
    assert torch.equal(checkpoint["weights"], torch.full((3 << 20,), 1.0))
    folder = join_uri(out, "checkpoints")
    listed = [uri.rsplit("/", 1)[-1] for uri in storage.list(folder)]
    if stall_on == ".pt":  # the new checkpoint never became visible
        assert listed == ["latest.json", "step_000000001.pt"]
    else:  # the new checkpoint is whole but unreferenced; the pointer is the old one, whole
        assert listed == ["latest.json", "step_000000001.pt", "step_000000002.pt"]
        assert json.loads(storage.read_bytes(join_uri(folder, "latest.json")))["step"] == 1
        data = torch.load(io.BytesIO(storage.read_bytes(join_uri(folder, "step_000000002.pt"))), weights_only=True)
        assert data["step"] == 2


def test_a_non_finite_loss_halts_with_the_last_good_checkpoint(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 3's loss turns NaN: the run stops with a message naming it, checkpoint 2 stays the latest."""
    calls = {"n": 0}
    real_terms = engine.loss_terms

    def poisoned(*args, **kwargs):
        terms = real_terms(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["dino"] = terms["dino"] * float("nan")
        return terms

    monkeypatch.setattr(engine, "loss_terms", poisoned)
    out = tmp_path / "run"
    cfg = tiny_config(str(out), "checkpoint_every=2", "max_steps=5")
    storage = Storage()
    with pytest.raises(FloatingPointError, match=r"loss is nan \(.*'dino': nan"):
        pretrain(cfg, RandomImages(), collate_samples, storage)
    checkpoint = load_latest_checkpoint(storage, str(out))
    assert checkpoint is not None and checkpoint["step"] == 2
    for part in ("student", "teacher"):
        assert all(torch.isfinite(t).all() for t in checkpoint[part].values()), part
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step_000000002.pt"]
    assert not (out / "summary.json").exists() and not (out / "backbone.safetensors").exists()

    # the run resumes from step 2 once the cause is gone and finishes
    monkeypatch.setattr(engine, "loss_terms", real_terms)
    summary = pretrain(cfg, RandomImages(), collate_samples, storage)
    assert summary["steps"] == 5
