"""Submitting to a cluster, up to the request: a stand-in for the KFP API server records it.

No Kubeflow cluster can run here, so the KFP API is replaced by a small HTTP server on
127.0.0.1 that answers the two calls a submission makes (find or create the experiment, create
the run) and keeps what it was sent. The KFP client, the compiler and the HTTP traffic are real.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app


class StandInKfpApi(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict]] = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(("GET", self.path, {}))
        self._reply({"experiments": [{"experiment_id": "exp-1", "display_name": "dinoflow"}], "total_size": 1}
                    if self.path.startswith("/apis/v2beta1/experiments") else {})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.requests.append(("POST", self.path, {**body, "_auth": self.headers.get("Authorization")}))
        if self.path.startswith("/apis/v2beta1/runs"):
            self._reply({"run_id": "run-42", "display_name": body.get("display_name"), "experiment_id": "exp-1"})
        else:
            self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def kfp_api() -> Iterator[str]:
    StandInKfpApi.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInKfpApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_submit_sends_the_compiled_pipeline_with_its_parameters(kfp_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "token-123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-9d2")
    result = CliRunner().invoke(app, ["pipeline", "submit", "retrain", "--host", kfp_api, "max_minutes=30",
                                      "overrides=[optim.batch_size=256]", "model_name=vits14-lvd"])
    assert result.exit_code == 0, result.output
    assert f"submitted 'retrain': run run-42 on {kfp_api}" in result.output
    runs = [body for method, path, body in StandInKfpApi.requests if method == "POST" and "/runs" in path]
    assert len(runs) == 1
    run = runs[0]
    assert run["_auth"] == "Bearer token-123"
    assert run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["parameters"] == {"max_minutes": 30, "overrides": ["optim.batch_size=256"],
                                                   "model_name": "vits14-lvd"}
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "retrain"
    # the Kubernetes section travels with it: every task reads the S3 Secret (by name only)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    assert {e["secretAsEnv"][0]["secretName"] for e in executors.values()} == {"dinoflow-s3"}
    # and the GPU: pretrain and evaluate ask for one each and tolerate the GPU nodes' taint, nothing else does
    accelerators = {name: e["container"]["resources"].get("accelerator", {}).get("resourceCount")
                    for name, e in spec["deploymentSpec"]["executors"].items()}
    assert {name: count for name, count in accelerators.items() if count} == {"exec-pretrain": "1",
                                                                              "exec-evaluate": "1"}
    assert sorted(name for name, e in executors.items() if e.get("tolerations")) == ["exec-evaluate", "exec-pretrain"]
    assert "planted-secret-9d2" not in json.dumps(run) and "token-123" not in yaml.safe_dump(spec)


def test_submit_with_gpus_0_asks_for_no_gpu(kfp_api: str) -> None:
    result = CliRunner().invoke(app, ["pipeline", "submit", "retrain", "--host", kfp_api, "--gpus", "0"],
                                env={"DINOFLOW_IMAGE": None})
    assert result.exit_code == 0, result.output
    (run,) = [body for method, path, body in StandInKfpApi.requests if method == "POST" and "/runs" in path]
    text = json.dumps(run["pipeline_spec"])
    assert "accelerator" not in text and "tolerations" not in text and "dinoflow-gpu" not in text


def test_submit_refuses_a_host_that_is_not_a_url() -> None:
    result = CliRunner().invoke(app, ["pipeline", "submit", "full", "--host", "kubeflow.example.com"])
    assert result.exit_code == 2
    assert "error: host must be an http(s) URL of the KFP API, got 'kubeflow.example.com'" in result.stderr
