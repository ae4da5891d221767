"""The MLflow server stops during training: training goes on, records wait and are sent later,
or their loss is reported.

A real ``mlflow server`` of this module's own is stopped and started again (same port, same
sqlite store) around tracker calls; a short pretraining run goes against a server that never
answers. MLflow's own HTTP retries are turned off here (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``)
so that the tracker's retries are what is tested, in seconds rather than minutes. Last, a record
the store refuses (on sqlite) is dropped and counted without holding up the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dinoflow.storage import Storage
from dinoflow.tracking import MlflowTracker, default_tracking_uri
from tests.reliability.helpers import RandomImages, one_torch_thread, tiny_config
from tests.servers import MlflowServer, free_port, running_mlflow
from trainer.data.datasets import collate_samples
from trainer.engine import pretrain


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A server of this module's own, which its tests stop and start."""
    with running_mlflow(tmp_path_factory.mktemp("mlflow-outage")) as server:
        yield server


@pytest.fixture(autouse=True)
def _fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def running(server: MlflowServer) -> bool:
    return server.process is not None and server.process.poll() is None


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_records_wait_while_the_server_is_down_and_are_sent_when_it_is_back(
    server: MlflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One stop and restart of the server, met by two trackers: one whose run was open before
    (nothing is lost), and one started during the outage with a small queue bound (its run is
    created when the server is back; the oldest metrics past the bound are dropped and counted)."""
    caplog.set_level(logging.WARNING, logger="dinoflow.tracking")
    if not running(server):
        server.start()
    tracker = MlflowTracker.start(server.uri, "outage", "mid-run", flush_timeout_s=60)
    assert tracker.run_id is not None
    tracker.log_params({"lr": 0.1})
    for step in range(10):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    assert tracker.flush(30)

    server.stop()
    opening = time.monotonic()
    late = MlflowTracker.start(server.uri, "outage", "down-at-start", start_timeout_s=1, flush_timeout_s=60,
                               max_pending_values=25)
    assert time.monotonic() - opening < 5 and late.run_id is None
    late.log_params({"seed": 3})
    slowest = 0.0
    for step in range(10, 40):  # "training" goes on: no call waits for the dead server
        started = time.monotonic()
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        late.log_metrics({"loss": float(step)}, step=step)
        if step == 20:
            tracker.set_tags({"phase": "outage"})
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.02)
    wait_for(lambda: tracker.delivery()["failed_attempts"] > 0, 20, "no send met the outage")
    assert slowest < 0.1, f"a tracker call waited {slowest:.2f} s for a dead server"
    assert tracker.delivery()["pending"] > 0
    assert late.delivery()["dropped"] == 6  # 1 param + 30 metric values queued, 25 kept

    server.start()
    report = tracker.finish()
    assert report["sent"] == 80 and report["pending"] == report["dropped"] == report["rejected"] == 0
    assert report["unsent_records"] == 0 and report["failed_attempts"] >= 1
    late_report = late.finish()
    assert late_report["sent"] == 24 and late_report["dropped"] == 6
    assert late_report["pending"] == late_report["unsent_records"] == 0

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "outage" and run.data.params["lr"] == "0.1"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == list(range(40))
    late_run = client.get_run(late.run_id)
    assert late_run.info.status == "FINISHED" and late_run.data.params["seed"] == "3"
    assert [m.step for m in client.get_metric_history(late.run_id, "loss")] == list(range(16, 40))
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m for m in messages) and any("answers again" in m for m in messages), messages
    assert any("did not answer within 1 s" in m for m in messages), messages
    lost = [m for m in messages if "not recorded" in m]
    assert len(lost) == 1 and lost[0].endswith("not recorded: 6 dropped") and late.run_id in lost[0], lost


def test_pretraining_completes_against_a_server_that_never_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The loss of every record is counted and reported in a warning, within the flush budget."""
    caplog.set_level(logging.WARNING, logger="dinoflow.tracking")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracker = MlflowTracker.start(uri, "outage", "never", start_timeout_s=1, flush_timeout_s=2)
    cfg = tiny_config(str(tmp_path / "run"), "max_steps=6", "checkpoint_every=3")
    with one_torch_thread(), tracker:
        summary = pretrain(cfg, RandomImages(), collate_samples, Storage(), tracker)
        finishing = time.monotonic()
    assert time.monotonic() - finishing < 2 + 3
    assert summary["steps"] == 6 and summary["mlflow_run_id"] is None
    assert (tmp_path / "run" / "backbone.safetensors").exists()
    report = tracker.delivery()
    assert report["sent"] == 0 and report["pending"] >= 6 * 5, report  # ≥ 5 metrics a step
    assert report["unsent_records"] >= 3, report  # the run start, its params, config.yaml, its end
    lost = [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]
    assert len(lost) == 1 and uri in lost[0], lost
    assert f"not recorded: {report['pending']} pending, {report['unsent_records']} unsent_records" in lost[0], lost


def test_a_refused_record_is_dropped_and_counted_and_holds_up_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What the store says no to is not retried forever: the records behind it still go."""
    caplog.set_level(logging.WARNING, logger="dinoflow.tracking")
    uri = default_tracking_uri(tmp_path)
    with MlflowTracker.start(uri, "refusals", "run", artifact_location=f"file://{tmp_path / 'a'}") as tracker:
        tracker.log_params({"lr": 0.1})
        tracker.log_params({"lr": 0.2})  # MLflow refuses to change a logged parameter
        tracker.log_metrics({"loss": 1.0}, step=0)
    report = tracker.delivery()
    assert report["rejected"] == 1 and report["sent"] == 1 and report["pending"] == report["unsent_records"] == 0
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1" and run.data.metrics["loss"] == 1.0
    messages = [r.getMessage() for r in caplog.records]
    assert any("refused a params record" in m for m in messages), messages
    assert any(m.endswith("not recorded: 1 rejected") for m in messages), messages

    client.delete_experiment(tracker.experiment_id)  # a deleted experiment takes no new run
    with pytest.raises(RuntimeError, match="refused to start run 'again'"):
        MlflowTracker.start(uri, "refusals", "again")
