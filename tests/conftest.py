"""Shared fixtures: real S3 and MLflow servers on 127.0.0.1, storage roots on file:// and s3://;
the order in which pytest-xdist hands out the test files, and the threads each worker computes on."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dinoflow.storage import RetryPolicy, Storage
from tests.servers import TEST_BUCKET, MlflowServer, SeaweedS3, running_mlflow, running_s3, s3_settings

# The files that take minutes (CI's durations on 2 cores, cold caches), longest first. ``make test``
# runs whole files per worker (``--dist loadfile``) in collection order (``--no-loadscope-reorder``:
# xdist would otherwise start with the files of most tests, the quick unit tests, and leave these
# few-test, long files for the end, where one worker runs the last of them while the other idles);
# handing these out first lets the many short files even out the workers' ends. Only the order
# depends on this list: a file missing from it runs after these, a stale name changes nothing.
LONGEST_FIRST = (
    "pipelines/test_pipelines.py",
    "trainer/test_distributed_resume.py",
    "trainer/test_gpu_check.py",
    "pipelines/test_demo.py",
    "reliability/test_kill_anywhere.py",
    "reliability/test_pipeline_faults.py",
    "trainer/test_deepspeed.py",
    "trainer/models/test_compile.py",
    "pipelines/test_curated_pipeline.py",
    "trainer/test_resume.py",
    "components/test_bundle.py",
    "trainer/test_distributed.py",
    "reliability/test_s3_outage.py",
    "trainer/test_train_step_benchmark.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker, and every process it starts, computes on its share of the cores:
    two processes of torch's default 2 threads on 2 cores ran a small ViT's training step 2.9x
    slower each than two of 1 thread (OpenMP's threads oversubscribed: 1.4 vs 4.1 steps/s, where
    one process alone does 5.7). An ``OMP_NUM_THREADS`` already set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first (:data:`LONGEST_FIRST`), each file's tests in their own order."""
    here = Path(__file__).parent
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(here).as_posix(), len(rank)))


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
