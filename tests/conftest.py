"""Shared fixtures: real S3 and MLflow servers on 127.0.0.1, storage roots on file:// and s3://."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dinoflow.storage import RetryPolicy, S3Settings, Storage
from tests.servers import MlflowServer, SeaweedS3

TEST_BUCKET = "dinoflow-tests"


def s3_settings(server: SeaweedS3) -> S3Settings:
    # SeaweedFS runs without auth here; any credentials are accepted
    return S3Settings(endpoint_url=server.endpoint, access_key="test", secret_key="test")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the whole session (tests that kill a server start their own)."""
    root = tmp_path_factory.mktemp("seaweed")
    server = SeaweedS3(root / "data", root / "weed.log")
    server.start()
    Storage(s3_settings(server)).make_bucket(f"s3://{TEST_BUCKET}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["file", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    """A Storage and a fresh root URI on each backend; the same tests run on both."""
    retry = RetryPolicy(attempts=3, first_delay_s=0.2, budget_s=10)
    if request.param == "file":
        return Storage(retry=retry), f"file://{tmp_path / 'store'}"
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    return Storage(s3_settings(server), retry=retry), f"s3://{TEST_BUCKET}/{uuid.uuid4().hex}"
