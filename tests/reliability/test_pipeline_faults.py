"""Faults in the pipelines: a stage process killed with SIGKILL, then the pipeline run again.

The ``full`` pipeline runs for real on kfp.local; once its pretrain stage has written a
checkpoint, the test finds that stage's process (the component's Python process under KFP's
shell) and kills it. The pipeline fails naming the task; the rerun keeps what the finished ingest
stage copied and resumes pretraining from the killed stage's checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipelines.local import PipelineFailed
from tests.pipelines.test_pipelines import DATA, FAST, Runs

# one pipeline run killed in its pretrain stage, one whole run: about 2 minutes on 2 cores
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(DATA).is_dir(), reason=f"Fashion-MNIST is not at {DATA}")]


def stage_process(function: str, root: Path) -> int | None:
    """The pid of the running component process of stage ``function`` whose outputs go under
    ``root`` (KFP runs ``python -m kfp.dsl.executor_main ... --function_to_execute <function>``)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended
            continue
        if "kfp.dsl.executor_main" in command and "--function_to_execute" in command and \
                command[command.index("--function_to_execute") + 1] == function and str(root) in " ".join(command):
            return int(cmdline.parent.name)
    return None


def checkpoint_step(root: Path) -> int:
    steps = [json.loads(p.read_text())["step"] for p in root.glob("work/pretrain/*/checkpoints/latest.json")]
    return max(steps, default=0)


def test_a_killed_stage_fails_the_pipeline_and_the_rerun_reuses_and_resumes(tmp_path: Path) -> None:
    runs = Runs(tmp_path)
    # 8 steps with a checkpoint after each, however slow the machine (a time budget could end on a
    # loaded one before the second): time enough to be killed after the second; a smaller
    # benchmark than FAST's (the evaluate and register stages only have to finish)
    params = {"data_source": DATA, **FAST, "overrides": [*FAST["overrides"], "checkpoint_every=1", "max_steps=8"],
              "max_minutes": 10.0, "train_limit": 500, "test_limit": 200, "eval_tasks": ["knn"]}
    outcome: dict[str, BaseException] = {}

    def first_run() -> None:
        try:
            runs.run("full", **params)
        except BaseException as err:  # noqa: BLE001 - checked below
            outcome["error"] = err

    thread = threading.Thread(target=first_run)
    thread.start()
    deadline = time.monotonic() + 240
    while checkpoint_step(tmp_path) < 2:
        assert thread.is_alive(), f"the pipeline ended before pretrain checkpointed: {outcome}"
        assert time.monotonic() < deadline, "pretrain never wrote a checkpoint"
        time.sleep(0.05)
    stage = stage_process("pretrain", tmp_path)
    assert stage is not None, "the pretrain stage's process was not found"
    os.kill(stage, signal.SIGKILL)
    thread.join(240)
    assert not thread.is_alive()
    killed_at = checkpoint_step(tmp_path)

    error = outcome.get("error")
    assert isinstance(error, PipelineFailed), outcome
    assert "pretrain" in str(error.__cause__), error.__cause__  # KFP names the task
    parent = runs.parents("full")[-1]
    assert parent.info.status == "FAILED"

    copied = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "fashion-mnist").iterdir()}
    assert len(copied) == 4, copied
    stages = runs.run("full", **params)
    assert list(stages) == ["ingest", "pretrain", "evaluate", "register"]
    assert all(s.status == "FINISHED" for s in stages.values())
    # the finished ingest's copy was kept, not written again; pretrain resumed from the killed
    # run's checkpoint (the rerun's first logged step comes after it) and finished
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "fashion-mnist").iterdir()} == copied
    history = runs.client.get_metric_history(newest_run(runs, "pretrain").info.run_id, "loss_total")
    assert history and min(m.step for m in history) > killed_at, (killed_at, [m.step for m in history][:5])
    assert not stages["pretrain"].cached and stages["pretrain"].metrics["steps"] > killed_at


def newest_run(runs: Runs, stage: str):
    experiment = runs.client.get_experiment_by_name("dinoflow")
    return runs.client.search_runs([experiment.experiment_id], f"tags.`dinoflow.stage` = '{stage}'",
                                   order_by=["start_time DESC"])[0]
