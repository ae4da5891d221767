"""The Kubernetes manifests: every kustomization renders offline, validates strictly, and keeps
the platform's rules (non-root, limits, Secrets only by reference, pinned images).

Why these rules are tests: a manifest that breaks one of them still applies cleanly, and the
cluster only complains later (a pod evicted for memory, an image that moved under a tag, a
password in git), so the checks run on the rendered output, as a cluster would receive it.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

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
OPERATOR_PATCH = K8S / "training-operator" / "operator-patch.yaml"
# where training-operator v1 reads its init-pytorch template (--pytorch-init-container-template-file's default)
OPERATOR_TEMPLATE_FILE = "/etc/config/initContainer.yaml"
# the template it falls back on, built in (v1.9.2, pkg/controller.v1/pytorch/initcontainer.go): no securityContext
OPERATOR_BUILT_IN_TEMPLATE = """
- name: init-pytorch
  image: {{.InitContainerImage}}
  imagePullPolicy: IfNotPresent
  resources:
    limits:
      cpu: 100m
      memory: 20Mi
    requests:
      cpu: 50m
      memory: 10Mi
  command: ['sh', '-c', 'err=1;for i in $(seq {{.MaxTries}}); do if nslookup {{.MasterAddr}}; then err=0 && break; \
fi;echo waiting for master; sleep 2; done; exit $err']
"""
TEMPLATE_FIELD = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")
# the fields every v1.x operator fills in (MaxTries came with v1.8: an older one fails on it)
OPERATOR_FIELDS = {"MasterAddr", "InitContainerImage"}
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
def test_pods_run_as_non_root_without_api_access(kustomization: str) -> None:
    """The platform's rules beyond the restricted profile: non-root set on the pod itself (so a
    container added later inherits it), no API token, an account of its own."""
    for resource in render(kustomization):
        for label, spec in pod_specs(resource):
            pod = spec.get("securityContext", {})
            assert pod.get("runAsNonRoot") is True, f"{label}: runAsNonRoot must be true"
            assert pod.get("runAsUser", 0) != 0, f"{label}: runAsUser must be a non-zero uid"
            assert spec.get("automountServiceAccountToken") is False, f"{label}: mounts an API token"
            assert spec.get("serviceAccountName", "default") != "default", f"{label}: uses the default account"


# The "restricted" Pod Security Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
# its baseline controls included, as the namespace enforces it (enforce-version: latest)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
CONTAINER_KINDS = ("initContainers", "containers", "ephemeralContainers")


def _context_violations(where: str, ctx: dict[str, Any]) -> list[str]:
    """The controls a pod's and a container's securityContext share."""
    found = []
    if ctx.get("runAsNonRoot") is False:
        found.append(f"{where}: runAsNonRoot is false")
    if ctx.get("runAsUser") == 0:
        found.append(f"{where}: runAsUser is 0 (root)")
    if ctx.get("seccompProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
        found.append(f"{where}: seccompProfile {ctx['seccompProfile']['type']} (RuntimeDefault or Localhost)")
    if ctx.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
        found.append(f"{where}: appArmorProfile {ctx['appArmorProfile']['type']} (RuntimeDefault or Localhost)")
    selinux = ctx.get("seLinuxOptions", {})
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        found.append(f"{where}: seLinuxOptions {selinux} (a container type only, no user or role)")
    if ctx.get("windowsOptions", {}).get("hostProcess"):
        found.append(f"{where}: a Windows HostProcess")
    return found


def _container_violations(where: str, container: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """The per-container controls; runAsNonRoot and the seccomp profile may come from the pod."""
    ctx = container.get("securityContext", {})
    found = _context_violations(where, ctx)
    if ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
        found.append(f"{where}: runAsNonRoot is not true (set on the pod or the container)")
    if "type" not in ctx.get("seccompProfile", pod.get("seccompProfile", {})):
        found.append(f"{where}: no seccompProfile (RuntimeDefault, on the pod or the container)")
    if ctx.get("allowPrivilegeEscalation") is not False:
        found.append(f"{where}: allowPrivilegeEscalation is not false")
    if ctx.get("privileged"):
        found.append(f"{where}: privileged")
    if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
        found.append(f"{where}: capabilities.drop lacks ALL")
    if set(ctx.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
        found.append(f"{where}: capabilities.add beyond NET_BIND_SERVICE")
    if ctx.get("procMount", "Default") != "Default":
        found.append(f"{where}: procMount {ctx['procMount']}")
    if any(port.get("hostPort") for port in container.get("ports", [])):
        found.append(f"{where}: a hostPort")
    return found


def restricted_violations(label: str, spec: dict[str, Any]) -> list[str]:
    """Every way a pod spec breaks the restricted profile, one line each (empty: it is admitted)."""
    pod = spec.get("securityContext", {})
    found = _context_violations(label, pod)
    found += [f"{label}: {key}" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    found += [f"{label}: volume {volume['name']} of a type not allowed ({', '.join(sorted(volume))})"
              for volume in spec.get("volumes", []) if not set(volume) - {"name"} <= RESTRICTED_VOLUMES]
    found += [f"{label}: unsafe sysctl {sysctl['name']}" for sysctl in pod.get("sysctls", [])
              if sysctl["name"] not in SAFE_SYSCTLS]
    for kind in CONTAINER_KINDS:
        for container in spec.get(kind, []):
            found += _container_violations(f"{label}/{container['name']}", container, pod)
    return found


def _apparmor_annotations(node: Any) -> list[tuple[str, str]]:
    """Every AppArmor annotation anywhere in a rendered resource (pod templates' metadata)."""
    if isinstance(node, list):
        return [pair for item in node for pair in _apparmor_annotations(item)]
    if not isinstance(node, dict):
        return []
    found = [(key, value) for key, value in node.get("annotations", {}).items()
             if isinstance(value, str) and key.startswith(APPARMOR_ANNOTATION)]
    return found + [pair for value in node.values() for pair in _apparmor_annotations(value)]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_pod_template_meets_the_restricted_profile(kustomization: str) -> None:
    """Every container and init container of every pod template (Deployments, StatefulSets, Jobs,
    both PyTorchJob replica types) as the namespace's ``restricted`` admission checks it."""
    for resource in render(kustomization):
        for label, spec in pod_specs(resource):
            assert not restricted_violations(label, spec), "\n".join(restricted_violations(label, spec))
        for key, value in _apparmor_annotations(resource):
            assert value == "runtime/default" or value.startswith("localhost/"), f"{key}: {value}"


def test_the_restricted_check_is_not_vacuous() -> None:
    """A pod that breaks each control is refused, for that control."""
    spec = {"hostNetwork": True, "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
            "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
            "initContainers": [{"name": "init", "securityContext": {"runAsUser": 0, "procMount": "Unmasked"}}],
            "containers": [{"name": "main", "ports": [{"containerPort": 80, "hostPort": 80}], "securityContext": {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
                "runAsNonRoot": False, "seccompProfile": {"type": "Unconfined"}, "privileged": True}}]}
    found = "\n".join(restricted_violations("Pod/p", spec))
    for expected in ("Pod/p: hostNetwork", "volume host", "kernel.msgmax", "init: runAsUser is 0",
                     "init: runAsNonRoot is not true", "init: no seccompProfile", "init: allowPrivilegeEscalation",
                     "init: capabilities.drop lacks ALL", "init: procMount", "main: seccompProfile Unconfined",
                     "main: runAsNonRoot is false", "main: privileged", "main: capabilities.add", "main: a hostPort"):
        assert expected in found, f"{expected!r} not reported:\n{found}"


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


def operator_worker_pods(job: dict[str, Any], template: str) -> list[tuple[str, dict[str, Any]]]:
    """The Worker pod specs of a PyTorchJob as training-operator v1 creates them: when the job has a
    Master, it appends the init containers of its template to every Worker (setInitContainer)."""
    replicas, name = job["spec"]["pytorchReplicaSpecs"], job["metadata"]["name"]
    if "Master" not in replicas or "Worker" not in replicas:
        return []
    fields = {"MasterAddr": f"{name}-master-0", "InitContainerImage": "alpine:3.10", "MaxTries": "100"}
    spec = copy.deepcopy(replicas["Worker"]["template"]["spec"])
    injected = yaml.safe_load(TEMPLATE_FIELD.sub(lambda field: fields[field[1]], template))
    spec["initContainers"] = spec.get("initContainers", []) + injected
    return [(f"PyTorchJob/{name}/Worker (as the operator creates it)", spec)]


def _operator_template() -> str:
    """The init-pytorch template the repository gives the operator (infra/k8s/training-operator)."""
    (configmap,) = render("training-operator")
    return configmap["data"]["initContainer.yaml"]


def test_pytorchjob_workers_meet_the_restricted_profile_with_the_operators_init_container() -> None:
    """The operator's init-pytorch is no part of the PyTorchJob's manifest but of its Worker pods, which
    the restricted namespace checks like any other: the template the repository gives the operator
    passes, and uses only the fields every v1.x operator fills in."""
    template = _operator_template()
    assert set(TEMPLATE_FIELD.findall(template)) <= OPERATOR_FIELDS, TEMPLATE_FIELD.findall(template)
    assert "{{" not in TEMPLATE_FIELD.sub("", template), "only {{.Field}} substitutions are checked here"
    (job,) = render("training")
    (pod,) = operator_worker_pods(job, template)
    assert [init["name"] for init in pod[1]["initContainers"]] == ["init-pytorch"]
    assert not restricted_violations(*pod), "\n".join(restricted_violations(*pod))


def test_the_operators_built_in_init_container_is_refused() -> None:
    """Why the repository ships a template: the Worker pods with the operator's own are not admitted."""
    (job,) = render("training")
    (pod,) = operator_worker_pods(job, OPERATOR_BUILT_IN_TEMPLATE)
    found = restricted_violations(*pod)
    assert f"{pod[0]}/init-pytorch: allowPrivilegeEscalation is not false" in found
    assert f"{pod[0]}/init-pytorch: capabilities.drop lacks ALL" in found


def test_the_operator_patch_mounts_the_template_where_the_operator_reads_it() -> None:
    patch = yaml.safe_load(OPERATOR_PATCH.read_text())["spec"]["template"]["spec"]
    (container,) = patch["containers"]
    assert container["name"] == "training-operator"
    (mount,) = container["volumeMounts"]
    (volume,) = patch["volumes"]
    (configmap,) = render("training-operator")
    assert volume == {"name": mount["name"], "configMap": {"name": configmap["metadata"]["name"]}}
    assert f"{mount['mountPath']}/{next(iter(configmap['data']))}" == OPERATOR_TEMPLATE_FILE
    assert configmap["metadata"]["namespace"] == "kubeflow"
