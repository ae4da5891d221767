"""infra/k8s/serve renders offline, validates strictly and keeps the platform's rules."""

from __future__ import annotations

import json
from pathlib import Path

from tests.infra.helpers import KUBERNETES_VERSION, containers, pod_specs, render, run_tool, tool

KUSTOMIZATION = "serve"


def test_serve_manifests_validate_strictly(tmp_path: Path) -> None:
    docs = render(KUSTOMIZATION)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
                     "Service", "ServiceAccount"]
    rendered = tmp_path / "serve.yaml"
    rendered.write_text("---\n".join(json.dumps(doc) + "\n" for doc in docs))
    result = run_tool(tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_pods_follow_the_platform_rules() -> None:
    docs = {doc["kind"]: doc for doc in render(KUSTOMIZATION)}
    deployment = docs["Deployment"]
    for label, spec in pod_specs(deployment):
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    for label, _, container in containers(deployment):
        assert container["image"] == "ghcr.io/dinoflow/dinoflow-cpu:0.1.0", label
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
        assert container["command"] == ["dinoflow", "serve"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
        for variable in container["env"]:
            assert "value" not in variable or "SECRET" not in variable["name"], f"{label}: {variable['name']} in plain text"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == selector
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
