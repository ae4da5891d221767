"""The Kubernetes manifests: every kustomization renders offline, validates strictly, and keeps
the platform's rules (non-root, limits, Secrets only by reference, pinned images).

Why these rules are tests: a manifest that breaks one of them still applies cleanly, and the
cluster only complains later (a pod evicted for memory, an image that moved under a tag, a
password in git), so the checks run on the rendered output, as a cluster would receive it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.infra.helpers import (
    K8S,
    KUBERNETES_VERSION,
    KUSTOMIZATIONS,
    containers,
    pod_specs,
    render,
    run_tool,
    tool,
)

PYTORCHJOB_SCHEMA = K8S / "schemas" / "pytorchjob-kubeflow-v1.json"
CUSTOM_KINDS = {"PyTorchJob"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
# user:password@ inside a URI: both parts must be $(VAR) references, never literals
URI_CREDENTIALS = re.compile(r"://([^:/@\s]+):([^@\s]+)@")
REFERENCE = re.compile(r"^\$\([A-Z_][A-Z0-9_]*\)$")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_core_resources_validate_strictly(kustomization: str, tmp_path: Path) -> None:
    """``kubernetes-validate --strict`` accepts every core resource (unknown fields fail)."""
    core = [doc for doc in render(kustomization) if doc["kind"] not in CUSTOM_KINDS]
    assert core or kustomization == "training"
    if not core:
        return
    rendered = tmp_path / "core.yaml"
    rendered.write_text("---\n".join(json.dumps(doc) + "\n" for doc in core))
    result = run_tool(tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_custom_resources_validate_against_their_schema(kustomization: str) -> None:
    """Each PyTorchJob matches the strict CRD schema, and its pod templates are valid core pod
    templates (checked as a PodTemplate, strictly)."""
    schema = json.loads(PYTORCHJOB_SCHEMA.read_text())
    for doc in render(kustomization):
        if doc["kind"] != "PyTorchJob":
            continue
        jsonschema.validate(doc, schema)
        for replica, replica_spec in doc["spec"]["pytorchReplicaSpecs"].items():
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": f"{doc['metadata']['name']}-{replica.lower()}"},
                       "template": replica_spec["template"]}
            kubernetes_validate.validate(wrapper, KUBERNETES_VERSION, strict=True)


def test_training_kustomization_holds_a_pytorchjob() -> None:
    kinds = [doc["kind"] for doc in render("training")]
    assert kinds == ["PyTorchJob"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_run_as_non_root_without_privileges(kustomization: str) -> None:
    for resource in render(kustomization):
        for label, spec in pod_specs(resource):
            pod = spec.get("securityContext", {})
            assert pod.get("runAsNonRoot") is True, f"{label}: runAsNonRoot must be true"
            assert pod.get("runAsUser", 0) != 0, f"{label}: runAsUser must be a non-zero uid"
            assert spec.get("automountServiceAccountToken") is False, f"{label}: mounts an API token"
            assert spec.get("serviceAccountName", "default") != "default", f"{label}: uses the default account"
        for label, _, container in containers(resource):
            ctx = container.get("securityContext", {})
            assert ctx.get("runAsUser", 1) != 0, f"{label}: runs as root"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{label}: allows privilege escalation"
            assert ctx.get("privileged", False) is False, f"{label}: privileged"
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: capabilities not dropped"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_containers_request_and_limit_resources(kustomization: str) -> None:
    for resource in render(kustomization):
        for label, _, container in containers(resource):
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(bound, {}))
                assert not missing, f"{label}: no {bound} for {', '.join(sorted(missing))}"
            gpus = resources["limits"].get("nvidia.com/gpu")
            assert gpus == resources["requests"].get("nvidia.com/gpu"), f"{label}: GPU requests != limits"


def test_trainers_request_gpus() -> None:
    for resource in render("training"):
        for label, _, container in containers(resource):
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{label}: no GPU"


def _env_values(resource: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{label}/{env['name']}", env) for label, _, container in containers(resource)
            for env in container.get("env", [])]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_plaintext_secrets(kustomization: str) -> None:
    """Credentials reach pods only through Secret references; no manifest carries a Secret's data."""
    for resource in render(kustomization):
        label = f"{resource['kind']}/{resource['metadata']['name']}"
        assert resource["kind"] != "Secret", f"{label}: Secrets are created by hand (infra/README.md)"
        if resource["kind"] == "ConfigMap":
            assert not any(SECRET_NAME.search(key) for key in resource.get("data", {})), label
        for name, env in _env_values(resource):
            if SECRET_NAME.search(env["name"]):
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: set it from a Secret (secretKeyRef)"
        for _, _, container in containers(resource):
            for arg in container.get("command", []) + container.get("args", []):
                for user, password in URI_CREDENTIALS.findall(arg):
                    assert REFERENCE.match(user) and REFERENCE.match(password), f"{label}: credentials in {arg!r}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_images_are_pinned(kustomization: str) -> None:
    """Every image names its registry and a fixed version (a digest or a tag that is not latest)."""
    for resource in render(kustomization):
        for label, _, container in containers(resource):
            image = container["image"]
            assert "/" in image and "." in image.split("/")[0], f"{label}: {image} names no registry"
            if "@sha256:" in image:
                continue
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"{label}: {image} is not pinned to a tag or digest"


def test_pytorchjob_schema_rejects_what_the_operator_rejects() -> None:
    """The hand-written schema is not vacuous: unknown fields, two masters, a wrong container name fail."""
    schema = json.loads(PYTORCHJOB_SCHEMA.read_text())
    job = render("training")[0]
    jsonschema.validate(job, schema)
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    broken = [
        {**job, "spec": {**job["spec"], "pytorchReplicaSpec": {}}},
        {**job, "spec": {**job["spec"], "pytorchReplicaSpecs": {"Master": {**master, "replicas": 2}}}},
        {**job, "spec": {**job["spec"], "runPolicy": {"cleanPodPolicy": "Sometimes"}}},
        {**job, "spec": {**job["spec"], "pytorchReplicaSpecs": {"Master": {
            **master, "template": {"spec": {"containers": [{"name": "trainer"}]}}}}}},
    ]
    for doc in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema)
