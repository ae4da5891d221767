"""Shared by the workflow tests: reading a GitHub workflow, its command lines, and the values its
``${{ ... }}`` expressions take.

Why: a workflow fails on GitHub, at 3 a.m. or on a release tag, on a typo nobody ran by hand
(a renamed CLI option, a missing module, an unpinned action); these helpers let each workflow's
test check every command line against what the repository really has, and compute the
environment a job really gets from its repository variables.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import typer
import yaml

from pipelines.cli import app
from tests.infra.helpers import REPO

WORKFLOWS = REPO / ".github" / "workflows"
# `uses: owner/name@<40 hex>  # vX.Y.Z`: pinned by commit, the version it is named in a comment
PINNED_ACTION = re.compile(r"uses:\s*(?P<action>[\w.-]+/[\w.-]+)@(?P<sha>[0-9a-f]{40})\s+#\s*v\d+\.\d+\.\d+\s*$")
STANDARD_OWNERS = {"actions", "docker"}  # GitHub's own actions and Docker's


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def triggers(path: Path) -> dict[str, Any]:
    return load(path)[True]  # YAML 1.1 reads the key `on` as True


def steps(path: Path) -> list[dict[str, Any]]:
    """Every step of every job, in order."""
    return [step for job in load(path)["jobs"].values() for step in job["steps"]]


def command_lines(path: Path) -> list[str]:
    """Each logical line of the run scripts, split into simple commands (at |, &&, ||, ;, $( and the
    braces of a group, ``{ ...; }``, not those of ``${VAR}``); GitHub expressions (``${{ ... }}``)
    become a placeholder word first."""
    scripts = "\n".join(step["run"] for step in steps(path) if "run" in step)
    text = re.sub(r"\$\{\{[^}]*\}\}", "GITHUB_EXPRESSION", scripts)
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    return [part.strip() for line in lines for part in re.split(r"\|\||&&|\||;|(?<!\S)[{}](?!\S)|\$\(", line)
            if part.strip() and part.strip() != ")"]


def _check_options(command: Any, words: list[str], where: str) -> None:
    known = {opt for param in command.params for opt in param.opts}
    for word in words:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{where}: no option {word}; it has {sorted(known)}"


def dinoflow_command(path: list[str]) -> tuple[Any, list[str]]:
    """The (sub)command ``path`` names, and the words after it; a group (``commands``) is not one."""
    command: Any = typer.main.get_command(app)
    while hasattr(command, "commands") and path and path[0] in command.commands:
        command, path = command.commands[path[0]], path[1:]
    assert not hasattr(command, "commands"), f"dinoflow has no command {' '.join(path)}"
    return command, path


def check_commands(path: Path, shell: set[str], sudo: frozenset[str] = frozenset()) -> set[str]:
    """Check that every command of the workflow exists: ``dinoflow`` subcommands and ``python -m``
    modules of the repository (with their options), ``pip`` installs pinned by the repository's
    constraints, and the allowed ``shell`` commands (``sudo`` only for those in ``sudo``). Returns
    the repository commands seen (``dinoflow pipeline submit``, ``python -m infra.ci.x``)."""
    seen = set()
    for line in command_lines(path):
        words = shlex.split(line)
        name = words[0]
        if "=" in name and not name.startswith("-"):  # an assignment (run_id=...)
            continue
        if name == "dinoflow":
            command, rest = dinoflow_command(words[1:])
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
        elif name == "sudo":
            assert words[1] in sudo, f"{line}: sudo is allowed only for {sorted(sudo)}"
        else:
            assert name in shell, f"{line}: {name} is neither a repository command nor an allowed shell command"
    return seen


def unpinned_actions(path: Path) -> list[str]:
    """The ``uses:`` lines that are not a standard action pinned by commit with its version named."""
    bad = []
    for line in path.read_text().splitlines():
        if "uses:" not in line:
            continue
        match = PINNED_ACTION.search(line)
        if not match or match["action"].split("/")[0] not in STANDARD_OWNERS:
            bad.append(line.strip())
    return bad


def evaluate(value: str, contexts: dict[str, dict[str, Any]]) -> str:
    """``value`` with each ``${{ a || b || 'literal' }}`` replaced as GitHub does: the first operand
    that is not empty (else the last). Operands are quoted literals or context paths
    (``vars.NAME``, ``matrix.image``, ``needs.version.outputs.version``); an unset path is empty."""

    def operand(text: str) -> str:
        text = text.strip()
        if text.startswith("'") and text.endswith("'"):
            return text[1:-1]
        node: Any = contexts
        for part in text.split("."):
            node = node.get(part, "") if isinstance(node, dict) else ""
        return str(node)

    def expression(match: re.Match[str]) -> str:
        values = [operand(part) for part in match.group(1).split("||")]
        return next((v for v in values if v), values[-1])

    return re.sub(r"\$\{\{(.*?)\}\}", expression, value)


def job_env(path: Path, job: str, contexts: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The environment a job's steps get (its ``env:``), for these contexts (``vars``, ``secrets``)."""
    return {name: evaluate(str(value), contexts) for name, value in load(path)["jobs"][job].get("env", {}).items()}
