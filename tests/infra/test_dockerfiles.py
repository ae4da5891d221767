"""The Dockerfiles: hadolint-clean, non-root, pinned bases, and one source of dependencies.

Why "one source": the images must run the code with the dependencies the tests ran with, so
every ``pip install`` takes ``-c constraints.txt`` and installs the repository itself with
pyproject's extras (or torch alone, at the version constraints.txt pins); a package list typed
into a Dockerfile would drift from pyproject.toml.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from tests.infra.helpers import INFRA, REPO, render, run_tool, tool

DOCKER = INFRA / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
# the build targets that are published and run, and the images they become
TARGETS = {"cpu.Dockerfile": ("cpu", "mlflow-server"), "gpu.Dockerfile": ("gpu",)}


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def _arg_defaults(dockerfile: Path) -> dict[str, str]:
    return dict(arg.split("=", 1) for kind, arg in _instructions(dockerfile) if kind == "ARG" and "=" in arg)


def _pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments of every ``pip install`` in a RUN instruction."""
    installs = []
    for kind, args in _instructions(dockerfile):
        if kind != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                installs.append(words[words.index("install") + 1:])
    return installs


def _extras_used(dockerfile: Path) -> set[str]:
    """Extras named in install targets (``.[a,b]``), ``${EXTRAS}`` resolved from the ARG default
    and from the documented ``--build-arg EXTRAS=...`` variants."""
    text = dockerfile.read_text()
    values = [_arg_defaults(dockerfile).get("EXTRAS", "")] + re.findall(r"EXTRAS=([\w,-]+)", text)
    extras = {extra for value in values for extra in value.split(",") if extra}
    for words in _pip_installs(dockerfile):
        for word in words:
            match = re.fullmatch(r"\.\[([\w,-]+)\]", word)
            extras |= set(match.group(1).split(",")) if match else set()
    return extras


def missing_extras(pyproject_text: str) -> dict[str, set[str]]:
    """Extras the Dockerfiles install that ``pyproject_text`` does not define, by Dockerfile."""
    defined = set(tomllib.loads(pyproject_text)["project"].get("optional-dependencies", {}))
    return {path.name: _extras_used(path) - defined for path in DOCKERFILES if _extras_used(path) - defined}


def test_there_are_cpu_and_gpu_images() -> None:
    assert [path.name for path in DOCKERFILES] == ["cpu.Dockerfile", "gpu.Dockerfile"]


def test_hadolint_passes() -> None:
    result = run_tool(tool("hadolint"), "--config", str(DOCKER / "hadolint.yaml"), *map(str, DOCKERFILES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pip_installs_use_the_projects_constraints(dockerfile: Path) -> None:
    installs = _pip_installs(dockerfile)
    assert installs, f"{dockerfile.name} installs nothing"
    for words in installs:
        assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt", f"no -c constraints.txt: {words}"
        targets = [w for i, w in enumerate(words) if not w.startswith("-")
                   and words[i - 1] not in ("-c", "--index-url", "--extra-index-url")]
        is_repo = len(targets) == 1 and bool(re.fullmatch(r"\.(\[[\w,${}-]+\])?", targets[0]))
        assert targets == ["torch"] or is_repo, (
            f"{dockerfile.name}: pip installs {targets}; install the repo (.[extras]) or torch alone")


def test_dockerfile_extras_are_defined_in_pyproject() -> None:
    missing = missing_extras((REPO / "pyproject.toml").read_text())
    assert not missing, f"add these extras to pyproject.toml [project.optional-dependencies]: {missing}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_published_targets_run_as_non_root(dockerfile: Path) -> None:
    stages: dict[str, str | None] = {}
    current = ""
    for kind, args in _instructions(dockerfile):
        if kind == "FROM":
            words = args.split()
            current = words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
            parent = stages.get(words[0])
            stages[current] = parent
        elif kind == "USER":
            stages[current] = args.split(":")[0]
    for target in TARGETS[dockerfile.name]:
        user = stages.get(target)
        assert user not in (None, "0", "root"), f"{dockerfile.name} target {target} runs as root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    defaults = _arg_defaults(dockerfile)
    for kind, args in _instructions(dockerfile):
        if kind != "FROM":
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), args.split()[0])
        if image in {a.split()[-1] for k, a in _instructions(dockerfile) if k == "FROM" and " AS " in a.upper()}:
            continue  # a stage of this file
        assert "$" not in image, f"{dockerfile.name}: FROM {args} has no ARG default"
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert re.search(r"\d+\.\d+", tag) and tag != "latest", f"{dockerfile.name}: {image} not pinned"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_is_trimmed(dockerfile: Path) -> None:
    ignore = Path(f"{dockerfile}.dockerignore")
    assert ignore.is_file(), f"{ignore.name} missing (BuildKit reads <Dockerfile>.dockerignore)"
    entries = set(ignore.read_text().split())
    assert {".git", ".venv", "runs", "mlflow.db"} <= entries


def _project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_component_default_images_are_the_images_of_this_version() -> None:
    """The components' default CPU and GPU images are the ones the Dockerfiles say to build for
    this version (``components.definitions.TAG`` follows pyproject's version)."""
    from components.definitions import DEFAULT_IMAGES

    version = _project_version()
    assert DEFAULT_IMAGES.cpu == f"ghcr.io/dinoflow/dinoflow-cpu:{version}"
    assert DEFAULT_IMAGES.gpu == f"ghcr.io/dinoflow/dinoflow-gpu:{version}"
    assert f"-t {DEFAULT_IMAGES.cpu} ." in (DOCKER / "cpu.Dockerfile").read_text()
    assert f"-t {DEFAULT_IMAGES.gpu} ." in (DOCKER / "gpu.Dockerfile").read_text()


def test_manifests_use_the_images_of_this_version() -> None:
    version = _project_version()
    for kustomization in ("overlays/dev", "overlays/prod", "training"):
        for doc in render(kustomization):
            for spec in [doc.get("spec", {}).get("template", {}).get("spec", {})] + [
                    r["template"]["spec"] for r in doc.get("spec", {}).get("pytorchReplicaSpecs", {}).values()]:
                for container in spec.get("containers", []):
                    if container["image"].startswith("ghcr.io/dinoflow/"):
                        assert container["image"].endswith(f":{version}"), container["image"]


def _stage_chain(dockerfile: Path, target: str) -> tuple[str, list[tuple[str, str]]]:
    """The external image ``target`` starts from (ARG defaults resolved) and the instructions of
    ``target`` and of the stages it is built ``FROM``, in build order."""
    defaults = _arg_defaults(dockerfile)
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    for kind, args in _instructions(dockerfile):
        if kind == "FROM":
            words = args.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), words[0])
            current = []
            stages[words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages))] = (image, current)
        else:
            current.append((kind, args))
    image, instructions = stages[target]
    while image in stages and image != target:
        image, parent = stages[image]
        instructions = parent + instructions
    return image, instructions


def _apt_packages(instructions: list[tuple[str, str]]) -> set[str]:
    """The packages of every ``apt-get install`` in these RUN instructions."""
    packages: set[str] = set()
    for kind, args in instructions:
        for command in re.split(r"&&|;|\|\|", args) if kind == "RUN" else []:
            words = shlex.split(command)
            if words[:2] in (["apt-get", "install"], ["apt", "install"]):
                packages |= {word for word in words[2:] if not word.startswith("-")}
    return packages


# the targets that run training (the presets turn on model.compile_blocks, loss.compile and
# crops.compile): torch.compile needs a C/C++ compiler (Inductor's CPU code, Triton's launcher,
# DeepSpeed's JIT ops) and the headers of the Python it runs on (Python.h), or it runs eager
CXX_PACKAGES = {"g++", "build-essential"}
COMPILING_TARGETS = {"cpu.Dockerfile": ("cpu",), "gpu.Dockerfile": ("gpu",)}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_training_targets_can_run_torch_compile(dockerfile: Path) -> None:
    for target in COMPILING_TARGETS[dockerfile.name]:
        image, instructions = _stage_chain(dockerfile, target)
        packages = _apt_packages(instructions)
        assert packages & CXX_PACKAGES, f"{dockerfile.name} target {target}: no C++ compiler ({CXX_PACKAGES})"
        python_dev = {p for p in packages if re.fullmatch(r"(lib)?python3(\.\d+)?-dev", p)}
        if re.match(r"(docker\.io/(library/)?)?python:", image):
            # the official python images ship their own headers (/usr/local/include); Debian's
            # python3-dev would be another Python's
            assert not python_dev, f"{dockerfile.name} target {target}: {python_dev} on {image}"
        else:
            assert python_dev, f"{dockerfile.name} target {target}: no Python headers (python3-dev) on {image}"


def _has_uid_1000_user(image: str) -> bool:
    """Whether the base image is Ubuntu 23.04 or later, which ship user and group `ubuntu` as 1000."""
    release = re.search(r"ubuntu:?(\d{2})\.\d{2}", image)
    return bool(release and int(release.group(1)) >= 23) or bool(re.search(r"\b(noble|oracular|plucky)\b", image))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_uid_1000_is_free_before_the_user_is_made(dockerfile: Path) -> None:
    """``groupadd --gid 1000`` fails on a base that already has gid 1000 (Ubuntu 24.04: `ubuntu`)."""
    for target in TARGETS[dockerfile.name]:
        image, instructions = _stage_chain(dockerfile, target)
        script = " && ".join(args for kind, args in instructions if kind == "RUN")
        made = re.search(r"(groupadd|useradd)\b[^&;|]*--(gid|uid) 1000\b", script)
        if not made or not _has_uid_1000_user(image):
            continue
        before = script[:made.start()]
        assert re.search(r"userdel\b[^&;|]*\bubuntu\b", before), (
            f"{dockerfile.name} target {target}: {image} has user ubuntu (uid/gid 1000); remove it first")
