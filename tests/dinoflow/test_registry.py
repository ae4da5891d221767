"""Registry gate against real MLflow stores (sqlite file and an `mlflow server` over HTTP)."""

from __future__ import annotations

import contextlib
import http.server
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dinoflow.registry import (cached_version, champion_version, gate, lower_is_better, move_alias, pick_version,
                               register_version, version_metric)
from tests.servers import MlflowServer


@pytest.fixture(params=["sqlite", "server"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> MlflowClient:
    if request.param == "sqlite":
        return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    server: MlflowServer = request.getfixturevalue("mlflow_server")
    return MlflowClient(tracking_uri=server.uri)


def _version(client: MlflowClient, name: str, tmp_path: Path, metrics: dict[str, float], heads: str = "") -> str:
    experiment = client.get_experiment_by_name("registry-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "registry-tests", artifact_location=f"file://{tmp_path / 'artifacts'}")
    run = client.create_run(experiment_id)
    (tmp_path / "model.txt").write_text(str(metrics))
    client.log_artifact(run.info.run_id, str(tmp_path / "model.txt"), "backbone")
    return register_version(client, name, run.info.run_id, "backbone", metrics, heads=heads)


def test_the_alias_moves_only_for_a_better_version(client: MlflowClient, tmp_path: Path) -> None:
    name = f"gate-{uuid.uuid4().hex[:8]}"
    first = _version(client, name, tmp_path, {"knn_top1_k20": 0.70, "linear_top1": 0.72})
    assert version_metric(client, name, first, "knn_top1_k20") == pytest.approx(0.70)
    decision = gate(client, name, first, "knn_top1_k20")
    assert decision.promoted and decision.reason == "no champion yet" and champion_version(client, name) == first

    worse = _version(client, name, tmp_path, {"knn_top1_k20": 0.65})
    decision = gate(client, name, worse, "knn_top1_k20")
    assert not decision.promoted and champion_version(client, name) == first
    assert (decision.champion_version, decision.champion_value, decision.value) == (first, pytest.approx(0.70),
                                                                                     pytest.approx(0.65))

    within_margin = _version(client, name, tmp_path, {"knn_top1_k20": 0.705})
    assert not gate(client, name, within_margin, "knn_top1_k20", margin=0.01).promoted
    assert champion_version(client, name) == first

    better = _version(client, name, tmp_path, {"knn_top1_k20": 0.75})
    decision = gate(client, name, better, "knn_top1_k20", margin=0.01)
    assert decision.promoted and "0.7500 > 0.7000 + margin 0.01" == decision.reason
    assert champion_version(client, name) == better
    assert [v.version for v in client.search_model_versions(f"name='{name}'")].__len__() == 4


def test_an_error_metric_moves_the_alias_only_for_a_smaller_error(client: MlflowClient, tmp_path: Path) -> None:
    """A gate on depth RMSE (the suite's depth_rmse): a larger error kept out, a smaller one past
    the margin promoted; the direction is read from the metric's name."""
    name = f"gate-{uuid.uuid4().hex[:8]}"
    first = _version(client, name, tmp_path, {"depth_rmse": 0.40})
    assert gate(client, name, first, "depth_rmse").promoted
    worse = _version(client, name, tmp_path, {"depth_rmse": 0.90})
    decision = gate(client, name, worse, "depth_rmse")
    assert not decision.promoted and decision.reason == "0.9000 >= 0.4000 - margin 0 (lower is better)"
    within_margin = _version(client, name, tmp_path, {"depth_rmse": 0.395})
    assert not gate(client, name, within_margin, "depth_rmse", margin=0.01).promoted
    better = _version(client, name, tmp_path, {"depth_rmse": 0.30})
    decision = gate(client, name, better, "depth_rmse", margin=0.01)
    assert decision.promoted and decision.reason == "0.3000 < 0.4000 - margin 0.01 (lower is better)"
    assert champion_version(client, name) == better


def test_the_errors_among_the_suites_metrics_are_named_by_their_ends() -> None:
    errors = ["depth_rmse", "depth_abs_rel", "corruption_imagenet-c_mce", "corruption_imagenet-c_error", "rmse"]
    scores = ["knn_top1_k20", "linear_top1", "depth_delta1", "seg_miou", "finetune_top1", "paper_gap_nyu_lin4",
              "retrieval_map_hard"]
    assert [lower_is_better(metric) for metric in errors + scores] == [True] * len(errors) + [False] * len(scores)


def test_a_version_without_the_metric_cannot_pass(client: MlflowClient, tmp_path: Path) -> None:
    name = f"gate-{uuid.uuid4().hex[:8]}"
    version = _version(client, name, tmp_path, {"linear_top1": 0.8})
    with pytest.raises(ValueError, match="has no finite 'knn_top1_k20' to gate on"):
        gate(client, name, version, "knn_top1_k20")
    assert champion_version(client, name) is None


def test_a_person_moves_the_alias_back_and_every_move_is_written_on_its_version(client: MlflowClient,
                                                                                 tmp_path: Path) -> None:
    """A rollback past the gate: the champion goes back to an older version; the gate's move and
    the person's are each recorded on the version they landed on; the listing shows both."""
    from dinoflow.registry import model_versions, move_alias

    name = f"roll-{uuid.uuid4().hex[:8]}"
    first = _version(client, name, tmp_path, {"knn_top1_k20": 0.70, "linear_top1": 0.72})
    gate(client, name, first, "knn_top1_k20")
    second = _version(client, name, tmp_path, {"knn_top1_k20": 0.75})
    assert gate(client, name, second, "knn_top1_k20").promoted
    assert move_alias(client, name, first, reason="v2 drifts in use") == second
    assert champion_version(client, name) == first
    assert move_alias(client, name, second, alias="candidate") is None
    rows = model_versions(client, name)
    assert [(row.version, row.aliases) for row in rows] == [(second, ("candidate",)), (first, ("champion",))]
    assert rows[1].metrics == {"knn_top1_k20": pytest.approx(0.70), "linear_top1": pytest.approx(0.72)}
    assert rows[1].alias_moves["champion"].endswith("by hand: v2 drifts in use")
    assert rows[0].alias_moves["champion"].endswith("gate: 0.7500 > 0.7000 + margin 0")  # it was champion once
    assert rows[0].alias_moves["candidate"].endswith("by hand: (no reason given)")
    assert rows[0].registered.endswith("Z") and rows[0].run_id
    with pytest.raises(ValueError, match=rf"model '{name}' has no version '9'; its versions: 1, 2"):
        move_alias(client, name, "9")
    with pytest.raises(ValueError, match=rf"no registered model 'nope-{name}'; the registry holds: .*{name}"):
        model_versions(client, f"nope-{name}")
    with pytest.raises(ValueError, match="alias 'latest'"):
        move_alias(client, name, first, alias="latest")
    assert champion_version(client, name) == first


@contextlib.contextmanager
def _failing(server: MlflowServer, failing: str, code: int = 503) -> Iterator[tuple[str, list[str]]]:
    """A proxy to the real ``server`` whose GET requests to paths holding ``failing`` fail with
    ``code`` (503: as a struggling store's do); every other request is passed through. Yields its
    URI and the ``"METHOD path"`` of each request it received."""
    received: list[str] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            received.append(f"{self.command} {self.path}")
            if self.command == "GET" and failing in self.path:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"store busy")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            request = urllib.request.Request(f"{server.uri}{self.path}", data=body, method=self.command,
                                             headers={"Content-Type": self.headers.get("Content-Type", "")})
            try:
                with urllib.request.urlopen(request) as answer:
                    status, payload = answer.status, answer.read()
            except urllib.error.HTTPError as err:
                status, payload = err.code, err.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = _forward

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy) as proxy:
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{proxy.server_address[1]}", received
        finally:
            proxy.shutdown()


def test_a_store_that_does_not_answer_is_not_read_as_a_missing_champion(
        mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's "no such alias" means no champion yet; a store that fails the lookup (a 503)
    raises instead: the gate crowned any new version over a champion it could not read, and a
    command said a model had no champion. A served models:/ URI keeps the store's error code."""
    from serve.model import load_served_model

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    direct = MlflowClient(tracking_uri=mlflow_server.uri)
    name = f"m-{uuid.uuid4().hex[:8]}"
    first = _version(direct, name, tmp_path, {"knn_top1": 0.9})
    assert gate(direct, name, first, "knn_top1").promoted
    worse = _version(direct, name, tmp_path, {"knn_top1": 0.1})
    with _failing(mlflow_server, "/registered-models/alias") as (uri, _):
        proxied = MlflowClient(tracking_uri=uri)
        assert version_metric(proxied, name, worse, "knn_top1") == 0.1  # the rest of the store answers
        with pytest.raises(MlflowException, match="503"):
            gate(proxied, name, worse, "knn_top1")
        with pytest.raises(MlflowException, match="503"):
            pick_version(proxied, f"models:/{name}")
    with _failing(mlflow_server, "/registered-models/alias", code=403) as (uri, _):  # not retried
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(MlflowException, match=rf"^models:/{name}@champion: .*403") as served:
            load_served_model(f"models:/{name}@champion")
        assert served.value.error_code == "PERMISSION_DENIED"  # the store's, kept
    assert champion_version(direct, name) == first
    assert champion_version(direct, name, "nope") is None  # the registry's own answer: no such alias
    with pytest.raises(ValueError, match="has no alias 'nope'"):
        pick_version(direct, f"models:/{name}@nope")


def test_a_store_that_does_not_answer_is_not_read_as_a_missing_model_or_version(
        mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed lookup of a model does not create it anew (registering) nor read as "no such model"
    or "no such version" (moving an alias by hand); the registry's own answers still do."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    direct = MlflowClient(tracking_uri=mlflow_server.uri)
    name = f"m-{uuid.uuid4().hex[:8]}"
    first = _version(direct, name, tmp_path, {"knn_top1": 0.9})
    with _failing(mlflow_server, "/registered-models/get") as (uri, received):
        with pytest.raises(MlflowException, match="503"):
            register_version(MlflowClient(tracking_uri=uri), name, "run", "backbone", {"knn_top1": 0.5})
        with pytest.raises(MlflowException, match="503"):
            move_alias(MlflowClient(tracking_uri=uri), name, first)
    assert not [line for line in received if "/registered-models/create" in line]
    with _failing(mlflow_server, "/model-versions/get") as (uri, _):
        with pytest.raises(MlflowException, match="503"):
            move_alias(MlflowClient(tracking_uri=uri), name, first)
    with pytest.raises(ValueError, match=r"has no version '9'; its versions: 1"):
        move_alias(direct, name, "9")
    with pytest.raises(ValueError, match=rf"no registered model 'other-{name}'"):
        move_alias(direct, f"other-{name}", "1")


def test_an_artifact_server_refusing_a_registered_models_download_is_said_as_its_error(
        mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered model whose download the artifact server refuses (a 403, not retried) ends the
    command in one line with MLflow's error and exit status 1, as an endpoint's: the cache folder,
    which could be written, is not blamed."""
    from typer.testing import CliRunner

    from components.register import BACKBONE_IN_RUN
    from pipelines.cli import app

    direct = MlflowClient(tracking_uri=mlflow_server.uri)
    name = f"m-{uuid.uuid4().hex[:8]}"
    run = direct.create_run(direct.create_experiment(f"proxied-{name}"))  # artifacts through the server
    (tmp_path / "backbone.safetensors").write_bytes(b"weights")
    direct.log_artifact(run.info.run_id, str(tmp_path / "backbone.safetensors"), BACKBONE_IN_RUN.rsplit("/", 1)[0])
    version = register_version(direct, name, run.info.run_id, "model", {"knn_top1": 0.5})
    assert gate(direct, name, version, "knn_top1").promoted
    monkeypatch.setenv("DINOFLOW_CACHE_DIR", str(tmp_path / "cache"))
    with _failing(mlflow_server, "/mlflow-artifacts/", code=403) as (uri, received):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        result = CliRunner().invoke(app, ["pretrain", "--config", "tiny", f"init_weights=models:/{name}@champion",
                                          f"out={tmp_path / 'run'}"])
    assert any("/mlflow-artifacts/" in line for line in received)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Failed to download artifacts") and "cache" not in last, last


def test_a_version_without_a_run_is_refused_before_its_cache_folder_is_made(tmp_path: Path) -> None:
    """A version registered from a path, not a run, has no run to fetch from nor to name its cache
    folder by (it would be ``<version>-None``, shared by every such version 1)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("bare")
    found = client.create_model_version("bare", f"file://{tmp_path / 'weights'}")
    with pytest.raises(ValueError, match=r"'bare' version 1 has no run to fetch it from \(its source: file://"):
        cached_version(client, "sqlite:///x", found, "model/backbone.safetensors", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
