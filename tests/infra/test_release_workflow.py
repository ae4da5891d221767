"""The release workflow: valid for GitHub's schema, standard pinned actions, commands that exist,
and images tagged with the package version.

Why: it runs only when someone pushes a version tag, so a mistake shows up mid-release; its
version check is run here as written (bash, the real pyproject.toml), and each image it builds
is checked against the Dockerfile stages and the names the pipelines and manifests pull.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from components.definitions import REGISTRY, TAG, Images
from tests.infra.helpers import REPO, containers, render, run_tool, tool
from tests.infra.workflows import WORKFLOWS, check_commands, evaluate, job_env, load, triggers, unpinned_actions

WORKFLOW = WORKFLOWS / "release.yml"
SHELL = {"test", "echo", "exit", "sed"}
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_workflow_is_valid_for_githubs_schema() -> None:
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW))
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_runs_on_version_tags_only() -> None:
    assert triggers(WORKFLOW) == {"push": {"tags": ["v*"]}}


def test_every_command_exists_and_actions_are_standard_and_pinned() -> None:
    check_commands(WORKFLOW, SHELL, sudo=frozenset({"rm"}))
    assert unpinned_actions(WORKFLOW) == []


def _version_check(ref_name: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """The version job's check, run as GitHub runs it (``bash -e``) in the repository."""
    (step,) = [s for s in load(WORKFLOW)["jobs"]["version"]["steps"] if s.get("id") == "check"]
    output = tmp_path / "github_output"
    output.write_text("")
    result = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=REPO, capture_output=True, text=True, timeout=30,
                            check=False,
                            env={"PATH": "/usr/bin:/bin", "GITHUB_REF_NAME": ref_name, "GITHUB_OUTPUT": str(output)})
    return result, output.read_text()


@pytest.mark.parametrize("ref_name", [f"v{VERSION}", "v0.0.0-other", VERSION])
def test_the_tag_must_name_the_package_version(ref_name: str, tmp_path: Path) -> None:
    result, output = _version_check(ref_name, tmp_path)
    if ref_name == f"v{VERSION}":
        assert result.returncode == 0, result.stdout + result.stderr
        assert output == f"version={VERSION}\n"
        assert TAG == VERSION  # the pipelines' default tag is the version the release pushes
    else:
        assert result.returncode == 1 and output == ""
        assert f"::error::tag {ref_name} is not v{VERSION}" in result.stdout


def test_images_are_the_ones_pipelines_and_manifests_pull() -> None:
    job = load(WORKFLOW)["jobs"]["images"]
    assert job["needs"] == "version", "images are pushed only after the version check"
    env = job_env(WORKFLOW, "images", {"vars": {}, "needs": {"version": {"outputs": {"version": VERSION}}}})
    assert env == {"DINOFLOW_REGISTRY": REGISTRY, "VERSION": VERSION}
    (build,) = [s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@")]
    pushed = {}
    for entry in job["strategy"]["matrix"]["include"]:
        dockerfile = REPO / entry["dockerfile"]
        assert f" AS {entry['target']}\n" in dockerfile.read_text(), f"{dockerfile.name} has no stage {entry['target']}"
        assert dockerfile.with_name(dockerfile.name + ".dockerignore").is_file()
        contexts = {"env": env, "matrix": entry}
        assert evaluate(build["with"]["file"], contexts) == entry["dockerfile"]
        assert evaluate(build["with"]["target"], contexts) == entry["target"]
        pushed[entry["target"]] = evaluate(build["with"]["tags"], contexts)
    assert build["with"]["push"] is True and build["with"]["context"] == "."
    images = Images.from_registry(REGISTRY, VERSION)
    assert (pushed["cpu"], pushed["gpu"]) == (images.cpu, images.gpu)
    # and the MLflow server the platform's prod overlay deploys
    deployed = {container["image"] for doc in render("overlays/prod") for _, _, container in containers(doc)
                if doc["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob")}
    assert pushed["mlflow-server"] in deployed, sorted(deployed)
