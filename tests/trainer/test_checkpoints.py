"""Checkpoints (``trainer/checkpoints.py``): found only through their pointer, the oldest pruned."""

from __future__ import annotations

import torch

from dinoflow.storage import Storage
from trainer.checkpoints import TrainState, latest_checkpoint_uri, load_latest_checkpoint, save_checkpoint


def test_checkpoints_are_found_only_through_the_pointer(tmp_path) -> None:
    storage, out = Storage(), str(tmp_path / "run")
    assert load_latest_checkpoint(storage, out) is None
    for step in (1, 2, 3):
        save_checkpoint(storage, out, _payload(step), step)
    (tmp_path / "run" / "checkpoints" / "step_000000009.pt").write_bytes(b"half-writ")  # never pointed at
    assert load_latest_checkpoint(storage, out)["step"] == 3
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["latest.json", "step_000000002.pt", "step_000000003.pt", "step_000000009.pt"]


def _payload(step: int) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"step": step, "weights": torch.ones(3) * step}, buffer)
    return buffer.getvalue()


def test_a_copied_run_folder_resumes_from_its_own_checkpoint(tmp_path) -> None:
    import json
    import shutil

    storage = Storage()
    save_checkpoint(storage, str(tmp_path / "a"), _payload(100), 100)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    save_checkpoint(storage, str(tmp_path / "a"), _payload(200), 200, keep=1)  # the original moves on
    assert load_latest_checkpoint(storage, str(tmp_path / "b"))["step"] == 100
    own = tmp_path / "b" / "checkpoints" / "step_000000100.pt"
    assert latest_checkpoint_uri(storage, str(tmp_path / "b")) == str(own)
    # a pointer from before the file's name was written alone: its URI's name, in the folder read
    (tmp_path / "b" / "checkpoints" / "latest.json").write_text(
        json.dumps({"step": 100, "uri": str(tmp_path / "gone" / "checkpoints" / "step_000000100.pt")}))
    assert load_latest_checkpoint(storage, str(tmp_path / "b"))["step"] == 100


def test_the_loader_batch_is_kept_and_an_older_checkpoint_resumes_at_its_step() -> None:
    """A checkpoint keeps the loader's next batch (past ``step x micro-batches`` once batches all bad
    were skipped); one written before it was kept, and a fresh run, start at ``step x micro-batches``."""
    kept = TrainState(step=3, loader_batch=7).to_checkpoint()
    assert TrainState.from_checkpoint(kept).start_batch(2) == 7
    older = {key: value for key, value in kept.items() if key != "loader_batch"}
    assert TrainState.from_checkpoint(older).start_batch(2) == 6
    assert TrainState().start_batch(4) == 0
