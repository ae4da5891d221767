"""The CI verdict reporter against a stand-in KFP API and a real (sqlite) MLflow store.

Why: it is the only thing that tells the team whether scheduled retraining promoted a model; the
run states and the MLflow tags it reads are the contract with the register stage.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dinoflow.tracking import TAG_PIPELINE_RUN
from infra.ci.report_verdict import EXIT_TIMED_OUT, app
from tests.infra.helpers import REPO

RUN_STATES = {"run-ok": "SUCCEEDED", "run-failed": "FAILED", "run-silent": "SUCCEEDED", "run-canceled": "CANCELED"}


class RunStatusApi(BaseHTTPRequestHandler):
    """Answers ``GET /apis/v2beta1/runs/<id>`` with that run's final state; any other id is RUNNING for ever."""

    def do_GET(self) -> None:
        run_id = self.path.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        body = json.dumps({"run_id": run_id, "state": RUN_STATES.get(run_id, "RUNNING")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def kfp_host() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), RunStatusApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An MLflow store where the register stage of ``run-ok`` and ``run-failed`` left its verdict."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("dinoflow")
    for run_id in ("run-ok", "run-failed"):
        client.create_run(experiment, tags={TAG_PIPELINE_RUN: run_id, "gate.verdict": "promoted",
                                            "gate.reason": "0.81 > 0.79", "gate.model_version": "7"})
    client.create_run(experiment, tags={TAG_PIPELINE_RUN: "run-silent"})  # a stage without a verdict
    return uri


def _report(kfp_host: str, tracking_uri: str, run_id: str, summary: Path, timeout_s: int = 30) -> tuple[int, str]:
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "GITHUB_STEP_SUMMARY": str(summary)}
    result = CliRunner().invoke(app, ["--host", kfp_host, "--run-id", run_id, "--poll-s", "1",
                                      "--timeout-s", str(timeout_s)], env=env)
    return result.exit_code, result.output


def test_success_reports_the_verdict(kfp_host: str, tracking_uri: str, tmp_path: Path) -> None:
    code, output = _report(kfp_host, tracking_uri, "run-ok", tmp_path / "summary.md")
    assert code == 0, output
    assert "gate: **promoted** (model version 7)" in output
    assert "promoted" in (tmp_path / "summary.md").read_text()


def test_a_failed_run_fails_the_job(kfp_host: str, tracking_uri: str, tmp_path: Path) -> None:
    code, output = _report(kfp_host, tracking_uri, "run-failed", tmp_path / "summary.md")
    assert code == 1 and "state **FAILED**" in output


def test_no_verdict_fails_clearly(kfp_host: str, tracking_uri: str, tmp_path: Path) -> None:
    code, output = _report(kfp_host, tracking_uri, "run-silent", tmp_path / "summary.md")
    assert code == 2 and "no verdict recorded" in output


def test_missing_tracking_uri_is_an_error(kfp_host: str) -> None:
    result = CliRunner().invoke(app, ["--host", kfp_host, "--run-id", "run-ok"], env={"MLFLOW_TRACKING_URI": ""})
    assert result.exit_code == 2 and "MLFLOW_TRACKING_URI" in result.output


def test_a_run_that_never_ends_times_out_in_one_line(kfp_host: str, tracking_uri: str, tmp_path: Path) -> None:
    """The wait's timeout is its own exit status with one line saying what was seen and where to look.

    Run as the workflow runs it, a real process (an uncaught exception there is a traceback and exit 1,
    the status of a failed run)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    result = subprocess.run([sys.executable, "-m", "infra.ci.report_verdict", "--host", kfp_host,
                             "--run-id", "run-endless", "--poll-s", "1", "--timeout-s", "1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == EXIT_TIMED_OUT and EXIT_TIMED_OUT not in (0, 1, 2), result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert re.match(r"error: KFP run run-endless still RUNNING after waiting [12]s \(--timeout-s 1\); ", line), line
    assert line.endswith(f"see {kfp_host}/#/runs/details/run-endless")
    assert "timed out" in (tmp_path / "summary.md").read_text()


def test_a_canceled_run_ends_the_wait(kfp_host: str, tracking_uri: str, tmp_path: Path) -> None:
    """KFP's own wait knows no CANCELED state: a canceled run would be waited on until the timeout."""
    code, output = _report(kfp_host, tracking_uri, "run-canceled", tmp_path / "summary.md", timeout_s=5)
    assert code == 1 and "state **CANCELED**" in output
