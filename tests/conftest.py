"""Shared fixtures: real S3 and MLflow servers on 127.0.0.1, storage roots on file:// and s3://."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dinoflow.storage import RetryPolicy, Storage
from tests.servers import TEST_BUCKET, MlflowServer, SeaweedS3, running_mlflow, running_s3, s3_settings


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the whole session (tests that kill a server start their own)."""
    with running_s3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with running_mlflow(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(params=["file", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    """A Storage and a fresh root URI on each backend; the same tests run on both."""
    retry = RetryPolicy(attempts=3, first_delay_s=0.2, budget_s=10)
    if request.param == "file":
        return Storage(retry=retry), f"file://{tmp_path / 'store'}"
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    return Storage(s3_settings(server), retry=retry), f"s3://{TEST_BUCKET}/{uuid.uuid4().hex}"
