"""A pretraining run's exact checkpoints: what one restores (:class:`TrainState`, the networks,
the objective's running state and the optimizer), written atomically behind a pointer, and the
training curves its record of step metrics draws."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dinoflow.config import PretrainConfig
from dinoflow.config_dump import to_yaml
from dinoflow.storage import Storage, join_uri
from dinoflow.tracking import Tracker
from trainer.strategy import Strategy

if TYPE_CHECKING:
    from trainer.engine import Objective, SSLNetwork

CURVE_POINTS = 1000  # rows of step metrics a run keeps for its training curves (TrainState.record)
CURVES_FILE = "training_curves.png"


@dataclass
class TrainState:
    """What a checkpoint restores."""

    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # wall time spent training, evaluations excluded, over all resumes
    history: list[dict[str, float]] = field(default_factory=list)
    bad_images: dict[str, Any] = field(default_factory=dict)  # BadImageTracker.summary() at the save
    curves: list[dict[str, float]] = field(default_factory=list)  # step metrics every curve_every steps
    curve_every: int = 0  # 0 until the first record

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> TrainState:
        return cls(checkpoint["step"], checkpoint["images_seen"], checkpoint["train_seconds"],
                   json.loads(checkpoint["history"]), json.loads(checkpoint.get("bad_images", "{}")),
                   json.loads(checkpoint.get("curves", "[]")), int(checkpoint.get("curve_every", 0)))

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields a checkpoint stores, as :meth:`from_checkpoint` reads them back."""
        return {"step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                "history": json.dumps(self.history), "bad_images": json.dumps(self.bad_images),
                "curves": json.dumps(self.curves), "curve_every": self.curve_every}

    def record(self, step: int, metrics: dict[str, float], every: int) -> None:
        """Keep step ``step``'s ``metrics`` for the training curves when it falls on the stride
        (``every`` steps at first); past :data:`CURVE_POINTS` rows the stride doubles and every other
        row goes, so a run of any length keeps a bounded, evenly spaced record in its checkpoints."""
        self.curve_every = self.curve_every or every
        if step % self.curve_every:
            return
        self.curves.append({"step": step, **metrics})
        if len(self.curves) > CURVE_POINTS:
            self.curve_every *= 2
            self.curves = [row for row in self.curves if row["step"] % self.curve_every == 0]


def write_training_curves(state: TrainState, storage: Storage, out: str, tracker: Tracker) -> None:
    """``<out>/training_curves.png`` (:func:`evaluators.visualize.save_training_curves` of the
    recorded steps and evaluations), also logged to ``tracker``; nothing when no step was recorded.
    The local copy it logs is left in place: an upload queued while the store is down reads it later."""
    import tempfile
    from pathlib import Path

    from evaluators.visualize import save_training_curves

    if not state.curves:
        return
    picture = save_training_curves(state.curves, state.history, Path(tempfile.mkdtemp()) / CURVES_FILE)
    storage.write_bytes(join_uri(out, CURVES_FILE), picture.read_bytes())
    tracker.log_artifact(picture)


def checkpoint_bytes(student: SSLNetwork, teacher: SSLNetwork, objective: Objective,
                     optimizer: torch.optim.Optimizer, state: TrainState, cfg: PretrainConfig,
                     strategy: Strategy | None = None) -> bytes:
    """The whole run state (gathered from every rank under ``strategy``: all ranks call this)."""
    strategy = strategy or Strategy()
    buffer = io.BytesIO()
    torch.save({
        "student": strategy.full_state_dict(student), "teacher": strategy.full_state_dict(teacher),
        "objective": objective.state_dict(), "optimizer": strategy.optimizer_state(student, optimizer),
        "config": to_yaml(cfg), **state.to_checkpoint(),
    }, buffer)
    return buffer.getvalue()


def pointer_uri(out: str) -> str:
    """``<out>/checkpoints/latest.json``: the pointer to a run's latest checkpoint (a run folder
    holds one once it has saved a checkpoint)."""
    return join_uri(out, "checkpoints", "latest.json")


def save_checkpoint(storage: Storage, out: str, data: bytes, step: int, keep: int = 2) -> str:
    """Write ``checkpoints/step_N.pt`` then point ``checkpoints/latest.json`` at it (both atomic);
    a checkpoint is only ever found through the pointer, so a half-written one is never read."""
    folder = join_uri(out, "checkpoints")
    uri = join_uri(folder, f"step_{step:09d}.pt")
    storage.write_bytes(uri, data)
    storage.write_bytes(pointer_uri(out), json.dumps({"step": step, "uri": uri}).encode())
    old = [u for u in storage.list(folder) if u.endswith(".pt") and u != uri]
    for stale in old[: max(len(old) - (keep - 1), 0)]:
        storage.delete(stale)
    return uri


def load_latest_checkpoint(storage: Storage, out: str) -> dict[str, Any] | None:
    """The checkpoint ``latest.json`` points at, or None for a fresh run."""
    pointer = pointer_uri(out)
    if not storage.exists(pointer):
        return None
    uri = json.loads(storage.read_bytes(pointer))["uri"]
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
