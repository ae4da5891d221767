"""SIGKILL at random moments of pretraining, then resume: the end is the uninterrupted run's end.

Each trial starts a tiny run, waits until the checkpoint of a step drawn from a seeded RNG is
written, waits a further random part of a checkpoint interval (so the kill lands inside a
forward/backward pass, an optimizer step, or a checkpoint or pointer write), kills the process
with SIGKILL, and resumes it in a fresh process. Every resumed run must end with the parameters,
teacher center and optimizer state of one uninterrupted run (1e-6, CPU fp32).

The processes fork from a server that has imported torch once (see ``helpers.fork_server``), so a
trial costs its training steps, not an interpreter start.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest

from dinoflow.storage import Storage
from tests.reliability.helpers import (
    assert_same_training_state,
    fork_server,
    train_tiny,
)
from trainer.checkpoints import latest_checkpoint_uri, load_latest_checkpoint

# 12 steps, a checkpoint every 2 (so most kills lose a step and redo it), stochastic depth on
# (its random stream must resume too), 2 blocks
EVERY = 2
OVERRIDES = ["optim.epochs=3", f"checkpoint_every={EVERY}", "model.depth=2", "model.drop_path_rate=0.2", "seed=7"]
STEPS = 12
TRIALS = 10
SEED = 20240611


def run_to_end(context, out: Path) -> None:
    process = context.Process(target=train_tiny, args=(str(out), OVERRIDES))
    process.start()
    process.join(120)
    if process.is_alive():
        process.kill()
    assert process.exitcode == 0, f"training {out} ended with {process.exitcode}"


def pointer_step(out: Path) -> int:
    pointer = out / "checkpoints" / "latest.json"
    if not pointer.exists():
        return 0
    return json.loads(pointer.read_text())["step"]


def kill_after(context, out: Path, step: int, fraction: float) -> int:
    """Start a run and SIGKILL it ``fraction`` of a checkpoint interval after checkpoint ``step``
    appears (the interval as this run just took it, so the kill lands before the next checkpoint
    but one, however loaded the machine); returns the step of the checkpoint it left."""
    process = context.Process(target=train_tiny, args=(str(out), OVERRIDES))
    process.start()
    deadline = time.monotonic() + 120
    seen: dict[int, float] = {}
    while (current := pointer_step(out)) < step:
        seen.setdefault(current, time.monotonic())
        assert process.is_alive(), f"the run ended ({process.exitcode}) before checkpoint {step}"
        assert time.monotonic() < deadline, f"checkpoint {step} never appeared"
        time.sleep(0.002)
    interval = time.monotonic() - max(seen.values())  # since the checkpoint before
    time.sleep(fraction * interval)
    process.kill()
    process.join(30)
    assert process.exitcode == -signal.SIGKILL, f"the run ended ({process.exitcode}) before it was killed"
    return pointer_step(out)


def kill_points() -> list[tuple[int, float]]:
    """(checkpoint to wait for, then the fraction of a checkpoint interval to wait) of every
    trial, from one seeded RNG; the checkpoint is one of 4, 6, 8 (the interval before it is
    timed), the fraction in [0, 1.5): the kill lands in either of the next two intervals."""
    rng = random.Random(SEED)
    return [(rng.randrange(2 * EVERY, STEPS - 2 * EVERY + 1, EVERY), rng.uniform(0.0, 1.5)) for _ in range(TRIALS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final checkpoint of one uninterrupted run."""
    out = tmp_path_factory.mktemp("kill-anywhere") / "reference"
    run_to_end(fork_server(), out)
    checkpoint = load_latest_checkpoint(Storage(), str(out))
    assert checkpoint is not None
    return checkpoint


@pytest.mark.parametrize("trials", [
    range(3),  # the default run: 3 of the 10 trials
    pytest.param(range(3, TRIALS), marks=pytest.mark.slow, id="range(3, 10)"),
], ids=str)
def test_sigkill_at_random_moments_then_resume_ends_like_an_uninterrupted_run(
    reference: dict, tmp_path: Path, trials: range
) -> None:
    context, storage = fork_server(), Storage()
    points = kill_points()
    for trial in trials:
        out = tmp_path / f"trial-{trial}"
        step, fraction = points[trial]
        saved = kill_after(context, out, step, fraction)
        # on a loaded machine the steps after a slow interval may run fast enough for the kill to
        # land after the last checkpoint, while the run writes its backbone: a rerun must end alike
        assert step <= saved <= STEPS
        name = f"trial {trial} (killed {fraction:.2f} intervals after checkpoint {step}; last checkpoint {saved})"
        # what a resume finds is whole: the pointer parses and names a listed checkpoint
        json.loads((out / "checkpoints" / "latest.json").read_text())
        assert latest_checkpoint_uri(storage, str(out)) in storage.list(str(out / "checkpoints")), name
        run_to_end(context, out)
        got = load_latest_checkpoint(storage, str(out))
        assert got is not None, name
        assert got["step"] == STEPS, name
        assert_same_training_state(got, reference, name)
        assert json.loads((out / "summary.json").read_text())["steps"] == STEPS, name


@pytest.fixture(autouse=True)
def _no_stray_children():
    """A failed assertion must not leave a training process running."""
    yield
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
        child.join(10)
