"""The retraining workflow: valid for GitHub's schema, and it only calls what exists.

Why: a scheduled workflow fails at 3 a.m. on a typo (a renamed CLI option, a missing module),
and nobody runs it by hand first; so every command line of its ``run:`` steps is checked
against the real CLI (options included), and the run-id extraction is checked against the real
output of ``dinoflow pipeline submit``.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import typer
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from tests.infra.helpers import REPO, run_tool, tool
from tests.pipelines.test_submit import kfp_api  # noqa: F401  (the stand-in KFP API fixture)

WORKFLOW = REPO / ".github" / "workflows" / "retrain.yml"
# shell commands the workflow may use besides the repository's own
SHELL = {"test", "echo", "exit", "tee", "sed"}


def _scripts() -> list[str]:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["retrain"]["steps"]
    return [step["run"] for step in steps if "run" in step]


def _command_lines() -> list[str]:
    """Each logical line of the run scripts, split into simple commands (at |, &&, ||, ;, {, }, $( );
    GitHub expressions (``${{ ... }}``) become a placeholder word first."""
    text = re.sub(r"\$\{\{[^}]*\}\}", "GITHUB_EXPRESSION", "\n".join(_scripts()))
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    return [part.strip() for line in lines for part in re.split(r"\|\||&&|\||;|\{|\}|\$\(", line)
            if part.strip() and part.strip() != ")"]


def _check_options(command: Any, words: list[str], where: str) -> None:
    known = {opt for param in command.params for opt in param.opts}
    for word in words:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{where}: no option {word}; it has {sorted(known)}"


def _dinoflow_command(path: list[str]) -> tuple[Any, list[str]]:
    """The (sub)command ``path`` names, and the words after it; a group (``commands``) is not one."""
    command: Any = typer.main.get_command(app)
    while hasattr(command, "commands") and path and path[0] in command.commands:
        command, path = command.commands[path[0]], path[1:]
    assert not hasattr(command, "commands"), f"dinoflow has no command {' '.join(path)}"
    return command, path


def test_workflow_is_valid_for_githubs_schema() -> None:
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW))
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_runs_on_a_schedule_and_by_hand() -> None:
    triggers = yaml.safe_load(WORKFLOW.read_text())[True]  # YAML 1.1 reads the key `on` as True
    assert "schedule" in triggers and "workflow_dispatch" in triggers


def test_every_command_exists() -> None:
    seen = set()
    for line in _command_lines():
        words = shlex.split(line)
        name = words[0]
        if "=" in name and not name.startswith("-"):  # an assignment (run_id=...)
            continue
        if name == "dinoflow":
            command, rest = _dinoflow_command(words[1:])
            _check_options(command, rest, line)
            seen.add(" ".join(words[:3]))
        elif name == "python":
            assert words[1] == "-m", f"{line}: run modules with python -m"
            if words[2] == "pip":
                assert "-c" in words and (REPO / words[words.index("-c") + 1]).is_file(), f"{line}: pin with -c"
            else:
                module = importlib.import_module(words[2])
                assert (REPO / Path(*words[2].split("."))).with_suffix(".py").is_file(), f"{line}: not in the repo"
                _check_options(typer.main.get_command(module.app), words[3:], line)
                seen.add(f"python -m {words[2]}")
        else:
            assert name in SHELL, f"{line}: {name} is neither a repository command nor an allowed shell command"
    assert {"dinoflow pipeline compile", "dinoflow pipeline submit", "python -m infra.ci.report_verdict"} <= seen


def test_run_id_is_read_from_the_real_submit_output(kfp_api: str) -> None:  # noqa: F811
    result = CliRunner().invoke(app, ["pipeline", "submit", "retrain", "--host", kfp_api, "max_minutes=1"])
    assert result.exit_code == 0, result.output
    expression = re.search(r"sed -n '([^']+)' submit\.log", WORKFLOW.read_text())
    assert expression, "the workflow no longer extracts the run id with sed"
    extracted = subprocess.run(["sed", "-n", expression.group(1)], input=result.output, capture_output=True,
                               text=True, check=True, timeout=10)
    assert extracted.stdout.strip() == "run-42"
