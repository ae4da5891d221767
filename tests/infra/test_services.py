"""The platform services start under the pods' hardening (read-only root filesystem, a uid with
no passwd entry) and within their memory limits.

Why: these settings apply cleanly and only fail on a cluster, at start (a crash loop) or under
load (an OOM kill): MinIO creates its certificates folder under HOME, which is ``/`` for a uid
without a passwd entry, and MLflow 3.x forks job workers unless told not to.
"""

from __future__ import annotations

import posixpath
from typing import Any

import pytest

from tests.infra.helpers import containers, render

OVERLAYS = ("overlays/dev", "overlays/prod")


def _container(overlay: str, kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, first container) of the workload ``kind``/``name`` as ``overlay`` renders it."""
    (resource,) = [doc for doc in render(overlay) if doc["kind"] == kind and doc["metadata"]["name"] == name]
    _, spec, container = next(containers(resource))
    return spec, container


def _option(args: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` in ``args`` (``--opt value`` or ``--opt=value``)."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minio_certs_dir_is_on_a_writable_volume(overlay: str) -> None:
    """MinIO makes ``<certs dir>/CAs`` at start; the default, ``$HOME/.minio/certs``, is on the
    read-only root filesystem (minio/minio#14763)."""
    spec, container = _container(overlay, "StatefulSet", "minio")
    certs_dir = _option(container.get("args", []), "--certs-dir", "-S")
    assert certs_dir, "minio: pass --certs-dir on a writable volume (HOME is / on a read-only root)"
    empty_dirs = {volume["name"] for volume in spec.get("volumes", []) if "emptyDir" in volume}
    mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty_dirs
              and not m.get("readOnly", False)]
    inside = [path for path in mounts
              if posixpath.commonpath([posixpath.normpath(certs_dir), posixpath.normpath(path)]) == path]
    assert inside, f"minio: --certs-dir {certs_dir} is not under a writable emptyDir mount {mounts}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_runs_no_job_workers(overlay: str) -> None:
    """Left unset, MLflow 3.17 forks job worker processes (huey) beside the web workers: memory
    the limits (dev: 1Gi) do not budget for."""
    _, container = _container(overlay, "Deployment", "mlflow")
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    assert env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false", env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION")
