"""The CI verdict reporter against a stand-in KFP API and a real (sqlite) MLflow store.

Why: it is the only thing that tells the team whether scheduled retraining promoted a model; the
run states and the MLflow tags it reads are the contract with the register stage.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dinoflow.tracking import TAG_PIPELINE_RUN
from infra.ci.report_verdict import EXIT_NO_VERDICT, EXIT_TIMED_OUT, app
from tests.infra.helpers import REPO

RUN_STATES = {"run-ok": "SUCCEEDED", "run-failed": "FAILED", "run-silent": "SUCCEEDED", "run-canceled": "CANCELED"}
MISSING_RUN = "run-missing"
FLAKY_RUN = "run-flaky"  # RUNNING, then the API server restarting (503) for two polls, then SUCCEEDED
FLAKY_ANSWERS: list[int] = []  # the statuses the stand-in gave FLAKY_RUN's reads
REFUSED_TOKEN = "expired-token"


class RunStatusApi(BaseHTTPRequestHandler):
    """Answers ``GET /apis/v2beta1/runs/<id>`` with that run's final state; any other id is RUNNING for ever,
    but ``MISSING_RUN`` is not found (404) and every request with ``REFUSED_TOKEN`` is unauthorized (401), the
    health check too, with bodies as the KFP API sends them."""

    def do_GET(self) -> None:
        run_id = self.path.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        if self.headers.get("Authorization") == f"Bearer {REFUSED_TOKEN}":
            self._answer(401, {"error": "Unauthorized", "code": 16, "message": "Unauthorized"})
        elif run_id == FLAKY_RUN:
            FLAKY_ANSWERS.append(503 if len(FLAKY_ANSWERS) in (1, 2) else 200)
            if FLAKY_ANSWERS[-1] == 503:
                self._answer(503, {"error": "upstream connect error", "code": 14, "message": "unavailable"})
            else:
                self._answer(200, {"run_id": run_id, "state": "RUNNING" if len(FLAKY_ANSWERS) == 1 else "SUCCEEDED"})
        elif run_id == MISSING_RUN:
            self._answer(404, {"error": f"Failed to get run {run_id}: ResourceNotFoundError", "code": 5,
                               "message": f"Failed to get run {run_id}: ResourceNotFoundError"})
        else:
            self._answer(200, {"run_id": run_id, "state": RUN_STATES.get(run_id, "RUNNING")})

    def _answer(self, status: int, answer: dict[str, object]) -> None:
        body = json.dumps(answer).encode()
        self.send_response(status)
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
    for run_id in ("run-ok", "run-failed", FLAKY_RUN):
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


def _report_process(kfp_host: str, tracking_uri: str, run_id: str, summary: Path, timeout_s: int = 30,
                    token: str | None = None) -> subprocess.CompletedProcess[str]:
    """The reporter run as the workflow runs it, a real process (an uncaught exception there is a traceback
    and exit 1, the status of a failed run)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "GITHUB_STEP_SUMMARY": str(summary)}
    env.pop("KF_PIPELINES_TOKEN", None)
    env.update({"KF_PIPELINES_TOKEN": token} if token else {})
    return subprocess.run([sys.executable, "-m", "infra.ci.report_verdict", "--host", kfp_host, "--run-id", run_id,
                           "--poll-s", "1", "--timeout-s", str(timeout_s)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_run_that_never_ends_times_out_in_one_line(kfp_host: str, tracking_uri: str, tmp_path: Path) -> None:
    """The wait's timeout is its own exit status with one line saying what was seen and where to look."""
    result = _report_process(kfp_host, tracking_uri, "run-endless", tmp_path / "summary.md", timeout_s=1)
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


@pytest.mark.parametrize(("run_id", "token", "status"), [
    (MISSING_RUN, None, "HTTP 404 Not Found (no such run, or --host is not the KFP API endpoint)"),
    ("run-ok", REFUSED_TOKEN, "HTTP 401 Unauthorized (KF_PIPELINES_TOKEN was refused)"),
])
def test_an_api_error_ends_in_one_line(kfp_host: str, tracking_uri: str, tmp_path: Path, run_id: str,
                                       token: str | None, status: str) -> None:
    """An unknown run id or a refused token is no verdict, in one line naming the host, the run and the status
    (the refused token fails the client's health check: once, not 5 times 5 s apart with a traceback each)."""
    result = _report_process(kfp_host, tracking_uri, run_id, tmp_path / "summary.md", token=token)
    assert result.returncode == EXIT_NO_VERDICT, result.stderr
    assert result.stdout == "" and result.stderr == f"error: cannot read KFP run {run_id} from {kfp_host}: {status}\n"
    assert f"`{run_id}`, not read from {kfp_host}: {status}" in (tmp_path / "summary.md").read_text()


def test_an_unreachable_host_ends_in_one_line(tracking_uri: str, tmp_path: Path) -> None:
    """A host where nothing listens (a port just closed) is no verdict, in one line naming the refused connection."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = _report_process(closed, tracking_uri, "run-ok", tmp_path / "summary.md")
    assert result.returncode == EXIT_NO_VERDICT, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: cannot read KFP run run-ok from {closed}: no connection: "), line
    assert line.endswith("Connection refused"), line
    assert f"not read from {closed}: no connection: " in (tmp_path / "summary.md").read_text()


def test_an_api_server_restarting_during_the_wait_is_polled_through(kfp_host: str, tracking_uri: str,
                                                                   tmp_path: Path) -> None:
    """A 503 after the first read (the API server restarting during an hours-long wait) does not end
    the wait: the polls go on and the run's verdict is reported."""
    code, output = _report(kfp_host, tracking_uri, FLAKY_RUN, tmp_path / "summary.md")
    assert code == 0, output
    assert FLAKY_ANSWERS == [200, 503, 503, 200] and "gate: **promoted**" in output
