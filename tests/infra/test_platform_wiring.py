"""The manifests and the code agree: the names the pipelines default to exist in the cluster
layout, and the access rules let the pipeline reach what it needs (and no more).

Why: the pipeline's cluster defaults (``pipelines.definitions``) and the Services, buckets and
NetworkPolicies are written in different files; a rename on one side breaks runs only on a cluster.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pytest

from pipelines.definitions import (
    CLUSTER_DATA,
    CLUSTER_RUN_ROOT,
    CLUSTER_TRACKING_URI,
    S3_SECRET,
    S3_SECRET_KEYS,
    SETTINGS_CONFIG_MAP,
    SETTINGS_KEYS,
)
from tests.infra.helpers import INFRA, render


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_pipeline_defaults_point_at_the_platform(overlay: str) -> None:
    docs = render(overlay)
    url = urlparse(CLUSTER_TRACKING_URI)
    service, namespace = url.hostname.split(".")[:2]  # type: ignore[union-attr]
    found = _by_kind(docs, "Service")[service]
    assert found["metadata"]["namespace"] == namespace
    assert url.port in [port["port"] for port in found["spec"]["ports"]]
    script = " ".join(_by_kind(docs, "Job")["minio-buckets"]["spec"]["template"]["spec"]["containers"][0]["args"])
    for uri in (CLUSTER_RUN_ROOT, CLUSTER_DATA):
        assert f"platform/{urlparse(uri).netloc}" in script, f"no bucket made for {uri}"
    mlflow_args = _by_kind(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a for a in mlflow_args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert url.netloc in allowed, "MLflow would reject the pipeline's Host header"


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_ingress_is_denied_by_default(overlay: str) -> None:
    policies = _by_kind(render(overlay), "NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    postgres = policies["postgres-clients"]["spec"]["ingress"]
    assert [peer["podSelector"]["matchLabels"] for rule in postgres for peer in rule["from"]] == [
        {"app.kubernetes.io/name": "mlflow"}]


def test_pipeline_role_grants_no_secrets_and_no_writes_beyond_jobs() -> None:
    role = _by_kind(render("overlays/prod"), "Role")["dinoflow-pipeline"]
    for rule in role["rules"]:
        assert "secrets" not in rule["resources"] and "*" not in rule["resources"] and "*" not in rule["verbs"]
        if rule["apiGroups"] != ["kubeflow.org"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_pipeline_tasks_settings_name_the_platform_services(overlay: str) -> None:
    """The ConfigMap every pipeline task reads (env) sits in KFP's namespace and points at the
    platform's MinIO and MLflow; the Secret the tasks read is the one the README creates."""
    (settings,) = render("pipelines")
    assert (settings["kind"], settings["metadata"]["name"]) == ("ConfigMap", SETTINGS_CONFIG_MAP)
    assert settings["metadata"]["namespace"] == "kubeflow"  # where KFP runs pipeline pods
    assert set(settings["data"]) == set(SETTINGS_KEYS)
    assert settings["data"]["MLFLOW_TRACKING_URI"] == CLUSTER_TRACKING_URI
    endpoint = urlparse(settings["data"]["AWS_ENDPOINT_URL"])
    service, namespace = endpoint.hostname.split(".")[:2]  # type: ignore[union-attr]
    minio = _by_kind(render(overlay), "Service")[service]
    assert minio["metadata"]["namespace"] == namespace and endpoint.port in [p["port"] for p in minio["spec"]["ports"]]
    readme = (INFRA / "README.md").read_text()
    assert f"create secret generic {S3_SECRET}" in readme and "namespace':'kubeflow'" in readme
    for key in S3_SECRET_KEYS:
        assert f"--from-literal={key}=" in readme
    job = _by_kind(render(overlay), "Job")["minio-buckets"]["spec"]["template"]["spec"]["containers"][0]
    assert {e["valueFrom"]["secretKeyRef"]["key"] for e in job["env"] if "valueFrom" in e
            and e["valueFrom"]["secretKeyRef"]["name"] == S3_SECRET} == set(S3_SECRET_KEYS)


def test_pipeline_pretrain_tolerates_the_gpu_taint_the_training_job_tolerates(tmp_path: Any) -> None:
    """The pipelines' GPU task and the PyTorchJob tolerate the same taint, the one the README puts
    on GPU nodes, and ask for the same GPU resource."""
    import re

    import yaml
    from kfp import compiler

    from pipelines.definitions import GPU_RESOURCE, build_pipelines

    out = tmp_path / "retrain.yaml"
    compiler.Compiler().compile(build_pipelines(gpus=1)["retrain"], str(out))
    spec, platform = yaml.safe_load_all(out.read_text())
    pipeline_tolerations = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-pretrain"][
        "tolerations"]
    (job,) = [doc for doc in render("training") if doc["kind"] == "PyTorchJob"]
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["tolerations"] == pipeline_tolerations
        assert GPU_RESOURCE in pod["containers"][0]["resources"]["limits"]
    assert spec["deploymentSpec"]["executors"]["exec-pretrain"]["container"]["resources"]["accelerator"][
        "resourceType"] == GPU_RESOURCE
    (taint,) = re.findall(r"kubectl taint nodes \S+ (\S+)", (INFRA / "README.md").read_text())
    key, _, effect = re.fullmatch(r"([^=:]+)(=[^:]*)?:(\w+)", taint).group(1, 2, 3)  # type: ignore[union-attr]
    assert [{"key": key, "operator": "Exists", "effect": effect}] == pipeline_tolerations
