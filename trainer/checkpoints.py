"""A pretraining run's exact checkpoints: what one restores (:class:`TrainState`, the networks,
the objective's running state and the optimizer), written atomically behind a pointer, read by
the main rank alone under a strategy of several ranks (:func:`shared_checkpoint`), and the
training curves its record of step metrics draws."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import yaml
from pydantic import BaseModel
from torch import nn

from dinoflow.config import PretrainConfig
from dinoflow.config_dump import flatten, to_yaml
from dinoflow.storage import Storage, basename, join_uri
from dinoflow.tracking import Tracker
from trainer.models.hub import read_torch_checkpoint
from trainer.optim import with_kernel_choice
from trainer.strategy import Strategy

if TYPE_CHECKING:
    from trainer.engine import Objective, SSLNetwork

RESUME_SETTINGS = ("seed", "data.kind", "data.uri", "optim.grad_accumulation", "model.arch", "model.patch_size",
                   "model.embed_dim", "model.depth", "model.num_heads", "model.ffn_layer", "model.num_register_tokens",
                   "heads")  # a resumed pretraining or distillation run keeps these (and its global batch)
CURVE_POINTS = 1000  # rows of step metrics a run keeps for its training curves (TrainState.record)
CURVES_FILE = "training_curves.png"
# a checkpoint's whole tensors (pretraining, distillation, fine-tuning): only the main rank holds them on resume
WHOLE_PARTS = ("student", "teacher", "model", "ema", "optimizer")


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
    loader_batch: int | None = None  # ImageStream.loader_batch after the last step run (rank 0's); None: unknown

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> TrainState:
        return cls(checkpoint["step"], checkpoint["images_seen"], checkpoint["train_seconds"],
                   json.loads(checkpoint["history"]), json.loads(checkpoint.get("bad_images", "{}")),
                   json.loads(checkpoint.get("curves", "[]")), int(checkpoint.get("curve_every", 0)),
                   checkpoint.get("loader_batch"))

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields a checkpoint stores, as :meth:`from_checkpoint` reads them back."""
        return {"step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                "history": json.dumps(self.history), "bad_images": json.dumps(self.bad_images),
                "curves": json.dumps(self.curves), "curve_every": self.curve_every, "loader_batch": self.loader_batch}

    def start_batch(self, micro_batches: int) -> int:
        """The loader batch the run's :class:`~trainer.batches.ImageStream` starts from: the one kept
        (the stream skips batches all bad, so it may be past ``step x micro_batches``), else, for a
        fresh run or a checkpoint written before it was kept, ``step x micro_batches``."""
        return self.step * micro_batches if self.loader_batch is None else self.loader_batch

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
                     strategy: Strategy | None = None) -> bytes | None:
    """The whole run state on the main rank, which writes it; None on the other ranks, which only
    take part in the gathers (under ``strategy`` all ranks call this) and so neither hold nor
    serialise a copy of it."""
    strategy = strategy or Strategy()
    student_state, teacher_state = strategy.full_state_dict_on_main(student), strategy.full_state_dict_on_main(teacher)
    optimizer_state = strategy.optimizer_state(student, optimizer)
    if not strategy.is_main:
        return None
    buffer = io.BytesIO()
    torch.save({
        "student": student_state, "teacher": teacher_state,
        "objective": objective.state_dict(), "optimizer": optimizer_state,
        "config": to_yaml(cfg), "world_size": strategy.world_size, **state.to_checkpoint(),
    }, buffer)
    return buffer.getvalue()


def pointer_uri(out: str) -> str:
    """``<out>/checkpoints/latest.json``: the pointer to a run's latest checkpoint (a run folder
    holds one once it has saved a checkpoint)."""
    return join_uri(out, "checkpoints", "latest.json")


def save_checkpoint(storage: Storage, out: str, data: bytes, step: int, keep: int = 2) -> str:
    """Write ``checkpoints/step_N.pt`` then point ``checkpoints/latest.json`` at it (both atomic);
    a checkpoint is only ever found through the pointer, so a half-written one is never read.

    The pointer names the file, not its URI: a run folder copied or synced elsewhere (to object
    storage, say, as a distillation's teacher) resumes from its own checkpoint, not the original's."""
    folder = join_uri(out, "checkpoints")
    name = f"step_{step:09d}.pt"
    uri = join_uri(folder, name)
    storage.write_bytes(uri, data)
    storage.write_bytes(pointer_uri(out), json.dumps({"step": step, "file": name}).encode())
    old = [u for u in storage.list(folder) if u.endswith(".pt") and u != uri]
    for stale in old[: max(len(old) - (keep - 1), 0)]:
        storage.delete(stale)
    return uri


def check_same_run(cfg: BaseModel, saved_config: str, settings: Sequence[str], run: str, out: str,
                   derived: Mapping[str, tuple[Any, Any]] | None = None) -> None:
    """Refuse to resume the ``run`` (its kind, in words) in ``out`` under ``settings`` (dotted
    names; a section's name covers its fields) other than its checkpoint's config (``saved_config``,
    YAML), or ``derived`` values ``name -> (now, the run's)`` that differ.

    Why: a resumed run continues the run it finds; with other data, seed or batch its loader would
    skip or repeat images, with another architecture the weights would not load, and neither would
    say which setting moved. Settings the saved config lacks (written before they existed) pass."""
    now, then = flatten(cfg), flatten(yaml.safe_load(saved_config))
    differ = [f"{key} = {now[key]!r} (the run: {then[key]!r})" for setting in settings for key in now
              if (key == setting or key.startswith(f"{setting}.")) and key in then and now[key] != then[key]]
    differ += [f"{name} = {current!r} (the run: {saved!r})" for name, (current, saved) in (derived or {}).items()
               if current != saved]
    if differ:
        raise ValueError(f"{out} holds a {run} run started otherwise: {'; '.join(differ)}; resume it with its "
                         "settings or use a new out")


def check_resumed(cfg: PretrainConfig, checkpoint: dict[str, Any], run: str, world_size: int,
                  settings: Sequence[str] = RESUME_SETTINGS,
                  derived: Mapping[str, tuple[Any, Any]] | None = None) -> None:
    """A pretraining or distillation ``run`` resumes from ``checkpoint`` on ``world_size`` ranks
    with its ``settings``, its global batch (``optim.batch_size`` images on each rank: another
    world size resumes with the same product) and the ``derived`` values given
    (:func:`check_same_run`)."""
    derived = dict(derived or {})
    if "world_size" in checkpoint:  # (checkpoints written before they recorded it: the batch unchecked)
        saved = yaml.safe_load(checkpoint["config"])["optim"]["batch_size"]
        derived["the global batch (optim.batch_size x ranks)"] = (cfg.optim.batch_size * world_size,
                                                                  saved * checkpoint["world_size"])
    check_same_run(cfg, checkpoint["config"], settings, run, cfg.out, derived)


def latest_checkpoint_uri(storage: Storage, out: str) -> str | None:
    """The URI of the checkpoint ``latest.json`` points at (in ``out``'s own folder), or None for a
    fresh run. A pointer written before it named its file holds the file's URI: its name is kept."""
    pointer = pointer_uri(out)
    if not storage.exists(pointer):
        return None
    named = json.loads(storage.read_bytes(pointer))
    return join_uri(out, "checkpoints", named.get("file") or basename(named["uri"]))


def load_latest_checkpoint(storage: Storage, out: str, strategy: Strategy | None = None) -> dict[str, Any] | None:
    """The checkpoint ``latest.json`` points at, or None for a fresh run; under ``strategy``, read
    by its main rank alone (every rank calls this: :func:`shared_checkpoint`)."""

    def read() -> dict[str, Any] | None:
        uri = latest_checkpoint_uri(storage, out)
        if uri is None:
            return None
        return dict(read_torch_checkpoint(storage.read_bytes(uri), uri))

    return shared_checkpoint(strategy or Strategy(), read)


def shared_checkpoint(strategy: Strategy, read: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """``read()`` (a checkpoint, or None) on the main rank of ``strategy`` alone (every rank calls
    this). The other ranks get what the main rank read but for the whole tensors: its settings,
    counters and objective state (broadcast), and None in place of each of :data:`WHOLE_PARTS` it
    holds, whose tensors reach them from the main rank through :meth:`Strategy.load_whole` and
    :func:`restore_optimizer`. So every rank checks the resumed settings as the main rank does.

    Why: each of a ViT-g's 8 ranks on a node read and unpickled the whole file (~18 GB) to keep
    its shards of it, ~144 GB of host memory at every resume. A file the main rank cannot read
    raises on every rank (:meth:`Strategy.read_on_main`), where the others waited for it."""
    read_whole: list[dict[str, Any] | None] = [None]

    def outline() -> dict[str, Any] | None:
        read_whole[0] = checkpoint = read()
        return None if checkpoint is None else {key: None if key in WHOLE_PARTS else value
                                                for key, value in checkpoint.items()}

    shared = strategy.read_on_main(outline, "read the latest checkpoint")
    return read_whole[0] if strategy.is_main else shared


def restore_optimizer(strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer,
                      saved: dict[str, Any] | None) -> None:
    """Load a checkpoint's optimizer state ``saved`` (:func:`shared_checkpoint`'s: None on the
    ranks other than the main one, which receive it) into ``optimizer``, with ``optimizer``'s own
    kernel choice (:func:`~trainer.optim.with_kernel_choice`); every rank calls this."""
    strategy.load_optimizer_state(model, optimizer, None if saved is None else with_kernel_choice(saved, optimizer))
