"""The code a component ships: dinoflow's packages and presets, embedded in the component.

Why: a lightweight KFP component runs a function's source in a container; with
``embedded_artifact_path`` KFP packs a folder into the component and puts it on ``sys.path``, so
every task runs this checkout's code with no ``pip install`` per task, locally and on a cluster.
KFP embeds the folder as base64 inside one command-line argument, and Linux caps a single argument
at 128 KiB (``MAX_ARG_STRLEN``), so the bundle holds only what stages import, its Python files
lose their docstrings and comments (``ast.unparse``: about 40 % smaller; the checkout stays the
readable source, and line numbers in a task's traceback refer to the shipped copy), and its size
is checked here, before anything runs.
"""

from __future__ import annotations

import ast
import base64
import gzip
import hashlib
import io
import shutil
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dinoflow", "trainer", "evaluators", "curation", "components", "configs")
# modules of PACKAGES that no stage imports, left out for room (tests check nothing shipped imports them):
# test data, retrieval, the real-dataset adapters of the dense benchmarks, the ONNX export
EXCLUDED = ("curation/synthetic.py", "curation/retrieve.py", "evaluators/dense_datasets.py",
            "trainer/models/onnx_export.py")
ARGUMENT_LIMIT = 128 * 1024  # bytes in one execve argument (MAX_ARG_STRLEN)
HEADROOM = 24 * 1024  # for the component's own source next to the archive


def bundle_files(root: Path = REPO_ROOT) -> list[Path]:
    """The files of :data:`PACKAGES` under ``root`` (sources and presets; no caches, nor
    :data:`EXCLUDED`), sorted."""
    files = []
    for package in PACKAGES:
        folder = root / package
        if not folder.is_dir():
            raise FileNotFoundError(f"cannot bundle {folder}: not a folder (run from a dinoflow checkout)")
        files += [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml")
                  and "__pycache__" not in p.parts and p.relative_to(root).as_posix() not in EXCLUDED]
    return sorted(files)


def code_digest(root: Path = REPO_ROOT) -> str:
    """SHA-256 over the bundled files' paths and bytes: the code version for stage caching."""
    digest = hashlib.sha256()
    for path in bundle_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _without_docstrings(source: str) -> str:
    """The same module with docstrings and comments dropped."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def encoded_size(folder: Path) -> int:
    """Bytes of ``folder`` as KFP embeds it: tar, gzip, base64."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=".")
    return len(base64.b64encode(gzip.compress(buffer.getvalue())))


def build_bundle(root: Path = REPO_ROOT, cache: Path | None = None) -> Path:
    """A folder holding the shipped copy of the bundled files, made once per code version.

    Raises ``ValueError`` when the encoded bundle would not fit in one command-line argument.
    """
    digest = code_digest(root)
    target = (cache or Path(tempfile.gettempdir()) / "dinoflow-bundles") / digest[:16]
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent if target.parent.exists() else None))
    for path in bundle_files(root):
        destination = staging / path.relative_to(root)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            destination.write_text(_without_docstrings(path.read_text()))
        else:
            shutil.copyfile(path, destination)
    size = encoded_size(staging)
    if size > ARGUMENT_LIMIT - HEADROOM:
        shutil.rmtree(staging)
        raise ValueError(
            f"the component code bundle encodes to {size // 1024} KiB, over the "
            f"{(ARGUMENT_LIMIT - HEADROOM) // 1024} KiB that fit in one container argument; "
            f"trim {', '.join(PACKAGES)} or ship the code in the base image"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
