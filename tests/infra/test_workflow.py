"""The retraining workflow: valid for GitHub's schema, and it only calls what exists.

Why: a scheduled workflow fails at 3 a.m. on a typo (a renamed CLI option, a missing module),
and nobody runs it by hand first; so every command line of its ``run:`` steps is checked
against the real CLI (options included), the run-id extraction is checked against the real
output of ``dinoflow pipeline submit``, and the pipeline its compile step makes from the job's
environment (repository variables unset or set) is checked: pretrain on the GPU image with a
GPU, the other stages on the CPU image.
"""

from __future__ import annotations

import inspect
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from components.definitions import REGISTRY, TAG
from infra.ci.report_verdict import main as report_verdict
from pipelines.cli import PARAMETER_FILES, app
from pipelines.definitions import GPU_RESOURCE, GPUS
from tests.infra.helpers import run_tool, tool
from tests.infra.workflows import WORKFLOWS, check_commands, command_lines, job_env, load, triggers, unpinned_actions
from tests.pipelines.test_submit import kfp_api  # noqa: F401  (the stand-in KFP API fixture)

WORKFLOW = WORKFLOWS / "retrain.yml"
# GitHub-hosted runners stop any job after 6 hours, whatever its timeout-minutes says
HOSTED_JOB_LIMIT_MIN = 360
# what the job does before the wait: install dinoflow, compile, submit
SETUP_MARGIN_S = 10 * 60
# shell commands the workflow may use besides the repository's own
SHELL = {"test", "echo", "exit", "tee", "sed"}


def test_workflow_is_valid_for_githubs_schema() -> None:
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW))
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_runs_on_a_schedule_and_by_hand() -> None:
    assert {"schedule", "workflow_dispatch"} <= set(triggers(WORKFLOW))


def test_every_command_exists() -> None:
    seen = check_commands(WORKFLOW, SHELL)
    assert {"dinoflow pipeline compile", "dinoflow pipeline submit", "python -m infra.ci.report_verdict"} <= seen


def test_actions_are_standard_and_pinned_by_commit() -> None:
    assert unpinned_actions(WORKFLOW) == []


def test_the_wait_fits_in_a_github_hosted_job() -> None:
    """The job's timeout is within the hosted runners' 6 h, and the wait for the run (the last
    step) leaves the setup's minutes inside it: a slow run fails the wait, not GitHub's clock."""
    job = load(WORKFLOW)["jobs"]["retrain"]
    labels = job["runs-on"] if isinstance(job["runs-on"], list) else [job["runs-on"]]
    timeout_min = job.get("timeout-minutes", HOSTED_JOB_LIMIT_MIN)
    if "self-hosted" not in labels:
        assert timeout_min < HOSTED_JOB_LIMIT_MIN, f"timeout-minutes {timeout_min}: hosted runners stop at 6 h"
    (line,) = [line for line in command_lines(WORKFLOW) if line.startswith("python -m infra.ci.report_verdict")]
    words = shlex.split(line)
    wait_s = (int(words[words.index("--timeout-s") + 1]) if "--timeout-s" in words
              else inspect.signature(report_verdict).parameters["timeout_s"].default)
    assert wait_s + SETUP_MARGIN_S <= timeout_min * 60, f"--timeout-s {wait_s} leaves no room in {timeout_min} min"


def _compiled_by_the_workflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              variables: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The workflow's compile command, run as written with the job's environment for these
    repository ``variables``; the compiled (spec, platform spec)."""
    env = job_env(WORKFLOW, "retrain", {"vars": variables, "secrets": {}, "inputs": {}})
    assert "DINOFLOW_IMAGE" not in env, "one image for every stage would put pretrain on the CPU image"
    (line,) = [line for line in command_lines(WORKFLOW) if line.startswith("dinoflow pipeline compile")]
    monkeypatch.chdir(tmp_path)
    words = shlex.split(line)
    result = CliRunner().invoke(app, words[1:], env={"DINOFLOW_IMAGE": None, **env})
    assert result.exit_code == 0, result.output
    out = words[words.index("--out") + 1]
    spec, platform = yaml.safe_load_all((tmp_path / out).read_text())
    return spec, platform


def _images_gpus_tolerations(spec: dict[str, Any], platform: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
    """Per task: its image, its accelerator count ('' when none) and whether it tolerates the GPU taint."""
    configs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {
        name.removeprefix("exec-"): (
            e["container"]["image"],
            e["container"].get("resources", {}).get("accelerator", {}).get("resourceCount", ""),
            any(t.get("key") == GPU_RESOURCE for t in configs[name].get("tolerations", [])),
        )
        for name, e in spec["deploymentSpec"]["executors"].items()
    }


def test_pretrain_and_evaluate_get_the_gpu_image_and_a_gpu_by_default(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec, platform = _compiled_by_the_workflow(tmp_path, monkeypatch, {})
    tasks = _images_gpus_tolerations(spec, platform)
    assert GPUS == 1
    assert tasks.pop("pretrain") == tasks.pop("evaluate") == (f"{REGISTRY}/dinoflow-gpu:{TAG}", "1", True)
    assert set(tasks.values()) == {(f"{REGISTRY}/dinoflow-cpu:{TAG}", "", False)}
    # the artifact a person uploads to the Kubeflow UI opens with the weekly set's values, as the run gets them
    weekly = yaml.safe_load((PARAMETER_FILES / "retrain-weekly.yaml").read_text())["parameters"]
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert {key: defaults[key]["defaultValue"] for key in weekly} == weekly


def test_repository_variables_pick_the_registry_tag_and_gpus(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    variables = {"DINOFLOW_REGISTRY": "registry.example/team", "DINOFLOW_TAG": "0.0.9", "DINOFLOW_GPUS": "0"}
    tasks = _images_gpus_tolerations(*_compiled_by_the_workflow(tmp_path, monkeypatch, variables))
    assert set(tasks.values()) == {("registry.example/team/dinoflow-cpu:0.0.9", "", False)}


def test_run_id_is_read_from_the_real_submit_output(kfp_api: str) -> None:  # noqa: F811
    result = CliRunner().invoke(app, ["pipeline", "submit", "retrain", "--host", kfp_api, "max_minutes=1"])
    assert result.exit_code == 0, result.output
    expression = re.search(r"sed -n '([^']+)' submit\.log", WORKFLOW.read_text())
    assert expression, "the workflow no longer extracts the run id with sed"
    extracted = subprocess.run(["sed", "-n", expression.group(1)], input=result.output, capture_output=True,
                               text=True, check=True, timeout=10)
    assert extracted.stdout.strip() == "run-42"
