"""Checkpoints (``trainer/checkpoints.py``): found only through their pointer, the oldest pruned."""

from __future__ import annotations

import torch

from dinoflow.storage import Storage
from trainer.checkpoints import load_latest_checkpoint, save_checkpoint


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
