"""Planted credentials never reach compiled pipeline YAML (nor its embedded code), error messages,
error records, or MLflow params, tags and logged configs."""

from __future__ import annotations

import base64
import gzip
import io
import re
import tarfile
import traceback
from pathlib import Path

import pytest
from kfp import compiler
from mlflow.tracking import MlflowClient

from components import unpack
from components.stage import StageContext, error_uri, recording_errors, storage_from_env
from dinoflow.storage import RetryPolicy, S3Settings, Storage, StorageError
from dinoflow.tracking import (
    MlflowTracker,
    default_artifact_location,
    default_tracking_uri,
    standard_tags,
)
from pipelines.definitions import build_pipelines
from tests.reliability.helpers import tiny_config

SECRET = "planted-SECRET-9d2e7a"
KEY_ID = "AKIAPLANTED9D2E7A"
SECRET_ENV = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SESSION_TOKEN": SECRET + "-token",
              "MLFLOW_TRACKING_TOKEN": SECRET + "-mlflow", "MLFLOW_TRACKING_PASSWORD": SECRET + "-pw",
              "KF_PIPELINES_TOKEN": SECRET + "-kfp"}


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)


def assert_clean(text: str, where: str, needles: tuple[str, ...] = (SECRET, KEY_ID)) -> None:
    for needle in needles:
        assert needle not in text, f"planted credential {needle!r} found in {where}"


def tar_files(archive: bytes, mode: str = "r") -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode=mode) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def embedded_files(text: str) -> dict[str, bytes]:
    """The files of every code bundle KFP embedded in the YAML (base64 of a gzipped tar), the
    packed code's archive (``code.tar.xz``) opened too."""
    files: dict[str, bytes] = {}
    for blob in re.findall(r"[A-Za-z0-9+/]{2000,}={0,2}", text):
        try:
            archive = gzip.decompress(base64.b64decode(blob))
        except (ValueError, OSError):
            continue
        for name, data in tar_files(archive).items():
            files[name] = data
            if name.endswith(unpack.ARCHIVE):
                files.update({f"{name}/{inner}": packed for inner, packed in tar_files(data, "r:xz").items()})
    return files


@pytest.mark.parametrize("name", ["full", "evaluate_only", "retrain", "promote"])
def test_compiled_pipelines_and_their_code_hold_no_credentials(planted: None, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(build_pipelines("registry.example/dinoflow:1")[name], str(out))
    text = out.read_text()
    assert_clean(text, f"{name}.yaml")
    files = embedded_files(text)
    assert any(path.endswith("storage.py") for path in files), "no embedded code bundle found to scan"
    for path, data in files.items():
        assert_clean(data.decode("utf-8", "replace"), f"{name}.yaml bundle file {path}")


def test_storage_errors_name_the_uri_but_not_the_credentials(planted: None, tmp_path: Path) -> None:
    storage = storage_from_env()
    assert storage.s3.secret_key == SECRET  # the credentials really are in use
    unreachable = Storage(S3Settings(endpoint_url="http://127.0.0.1:9", access_key=KEY_ID, secret_key=SECRET,
                                     session_token=SECRET, connect_timeout_s=0.5),
                          retry=RetryPolicy(attempts=2, first_delay_s=0.01, budget_s=5))
    # the access key id is an identifier (AWS shows it in its own logs); only the secret parts are hidden
    assert_clean(repr(unreachable.s3), "repr(S3Settings)", needles=(SECRET,))
    for operation in (lambda: unreachable.read_bytes("s3://bucket/key"),
                      lambda: unreachable.write_bytes("s3://bucket/key", b"x"),
                      lambda: unreachable.list("s3://bucket/")):
        with pytest.raises(StorageError, match="s3://bucket") as caught:
            operation()
        assert_clean("".join(traceback.format_exception(caught.value)), "a storage error's traceback")


def test_a_failed_stage_records_its_error_without_credentials(planted: None, tmp_path: Path) -> None:
    ctx = StageContext(run_root=str(tmp_path / "root"), pipeline_run_id="run-1")
    storage = Storage()
    bad = Storage(S3Settings.from_env({**SECRET_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
                  retry=RetryPolicy(attempts=1))
    with pytest.raises(StorageError), recording_errors(ctx, storage, "ingest"):
        bad.read_bytes("s3://data/images.tar")
    record = Path(error_uri(ctx, "ingest")).read_text()
    assert "s3://data/images.tar" in record
    assert_clean(record, "the stage's error record")


def test_mlflow_params_tags_and_config_hold_no_credentials(planted: None, tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    cfg = tiny_config("s3://bucket/run", "data.kind=shards", "data.uri=s3://bucket/shards")
    with MlflowTracker.start(uri, "secrets", "pretrain", tags=standard_tags("pretrain", "run-1"),
                             artifact_location=default_artifact_location(uri, str(tmp_path))) as tracker:
        tracker.log_config(cfg)
        tracker.log_params({"run_root": "s3://bucket/run"})
        run_id = tracker.run_id
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params["data.uri"] == "s3://bucket/shards"  # the config really was logged
    assert_clean(repr(run.data.params), "MLflow params")
    assert_clean(repr(run.data.tags), "MLflow tags")
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert_clean(config_yaml, "the logged config.yaml")
