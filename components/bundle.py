"""The code a component ships: the modules its stage imports, and the presets, embedded in it.

Why: a lightweight KFP component runs a function's source in a container; with
``embedded_artifact_path`` KFP packs a folder into the component and puts it on ``sys.path``, so
every task runs this checkout's code with no ``pip install`` per task, locally and on a cluster.
KFP embeds the folder as base64 inside one command-line argument, and Linux caps a single argument
at 128 KiB (``MAX_ARG_STRLEN``), so each component's bundle holds only the import closure of its
function (every module of :data:`PACKAGES` reachable through any ``import``, even one inside a
function, plus their packages' ``__init__``) and, where a shipped module reads presets, the YAML
presets; its Python files lose their docstrings, comments and functions' annotations
(:func:`shipped_source`, ``ast.unparse``: about 45 % smaller; the checkout stays the readable
source, and line numbers in a task's traceback refer to the shipped copy); and its size is
checked here, before anything runs. What a component embeds is the bundle packed
(:func:`pack_bundle`): the same files as one xz archive with a small loader
(:mod:`components.unpack`) that extracts it at the first import, about 15 % smaller than KFP's
gzip of the files. A side effect: a stage's cache key (:func:`code_digest` of its bundle)
changes only when code the stage can run changes.
"""

from __future__ import annotations

import ast
import base64
import functools
import gzip
import hashlib
import io
import lzma
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from components import unpack

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dinoflow", "trainer", "evaluators", "curation", "components", "configs")
# modules a shipped module hands to a library by file path instead of importing them
LOADED_BY_PATH = {"trainer.models.packaging": ("trainer.models.mlflow_entry",)}  # MLflow "models from code"
# the functions that read the YAML presets under configs/ (by name or path): a bundle without them ships none
PRESET_READERS = frozenset({"dinoflow.config.load_config", "dinoflow.config.preset_path", "dinoflow.config.load_yaml"})
# YAML under configs/ that only the host reads (the demo's settings, the pipelines' parameter sets): never shipped
HOST_CONFIGS = ("configs/demo.yaml", "configs/pipelines")
ARGUMENT_LIMIT = 128 * 1024  # bytes in one execve argument (MAX_ARG_STRLEN, its closing NUL included)
HEADROOM = 8 * 1024  # for the component's own source next to the archive (2-3 KiB; checked exactly: longest_argument)


def _module_file(name: str, root: Path) -> Path | None:
    """The file of module ``name`` under ``root`` (``a/b.py`` or ``a/b/__init__.py``), if it is ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(source: str, module: str = "", is_package: bool = False) -> set[str]:
    """Names every ``import`` of ``source`` may load, anywhere in it (``from a import b`` gives
    ``a`` and ``a.b``, which may be a submodule); relative imports are resolved against ``module``."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*parent, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@functools.cache
def _file_imports(path: Path, module: str, mtime_ns: int, size: int) -> frozenset[str]:
    """:func:`imported_modules` of the file at ``path`` (module ``module``), parsed once per version
    of the file (its modification time and size): every stage's bundle walks the same modules, and
    parsing them was most of the ~6 s that building the pipelines took."""
    return frozenset(imported_modules(path.read_text(), module, path.name == "__init__.py"))


def import_closure(roots: Iterable[str], root: Path = REPO_ROOT) -> list[Path]:
    """Files of the modules ``roots`` name and of every module of :data:`PACKAGES` they import
    (or load by path, :data:`LOADED_BY_PATH`), transitively, with the ``__init__.py`` of each
    package on the way; sorted."""
    pending = [name for name in roots]
    seen: set[Path] = set()
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # the packages above a module are imported first
            path = _module_file(".".join(parts[:depth]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            module = ".".join(parts[:depth])
            stat = path.stat()
            pending.extend(_file_imports(path, module, stat.st_mtime_ns, stat.st_size))
            pending.extend(LOADED_BY_PATH.get(module, ()))
    return sorted(seen)


def bundle_files(root: Path = REPO_ROOT, roots: Iterable[str] | None = None) -> list[Path]:
    """What a bundle under ``root`` holds: the import closure of ``roots`` and, when it reads
    presets (:data:`PRESET_READERS`), the YAML presets (not :data:`HOST_CONFIGS`: no stage reads
    them); or (``roots=None``) every source and YAML file of :data:`PACKAGES` there; sorted."""
    folders = [root / package for package in PACKAGES if (root / package).is_dir()]
    if not folders:
        raise FileNotFoundError(f"cannot bundle {root}: none of {', '.join(PACKAGES)} is there "
                                "(run from a dinoflow checkout)")
    closure = import_closure(roots, root) if roots is not None else []
    wanted = (".py", ".yaml") if roots is None else (".yaml",) if _reads_presets(closure, root) else ()
    host = [root / path for path in HOST_CONFIGS] if roots is not None else []
    files = [p for folder in folders for p in folder.rglob("*")
             if p.is_file() and p.suffix in wanted and "__pycache__" not in p.parts
             and not any(p == h or h in p.parents for h in host)]
    return sorted({*files, *closure})


def _reads_presets(files: Iterable[Path], root: Path) -> bool:
    """Whether any of ``files`` imports a function of :data:`PRESET_READERS`: only then does the
    bundle need the YAML presets (the evaluate stage's saves their 8 KiB of its argument)."""
    for path in files:
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        stat = path.stat()
        if _file_imports(path, module, stat.st_mtime_ns, stat.st_size) & PRESET_READERS:
            return True
    return False


def code_digest(root: Path = REPO_ROOT, roots: Iterable[str] | None = None) -> str:
    """SHA-256 over the bundled files' paths and bytes: the code version for stage caching (inside
    a task, ``root`` is the task's bundle, so that is the code its stage can run)."""
    digest = hashlib.sha256()
    for path in bundle_files(root, roots):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def shipped_source(source: str) -> str:
    """The same module with docstrings, comments and the annotations of function arguments and
    returns dropped. Annotations in class bodies stay: pydantic and dataclasses build their fields
    from them. (Nothing shipped reads a function's annotations at run time; the pipeline tests run
    the shipped copy, so a use that appears would fail there.)"""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            for argument in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
                             arguments.kwarg):
                if argument is not None:
                    argument.annotation = None
            node.returns = None
    return ast.unparse(tree) + "\n"


def encoded_size(folder: Path) -> int:
    """Bytes of ``folder`` as KFP embeds it: tar, gzip, base64."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=".")
    return len(base64.b64encode(gzip.compress(buffer.getvalue())))


def longest_argument(arguments: Iterable[str]) -> int:
    """Bytes of the longest of a container's ``arguments`` (command and args) as execve gets it,
    its closing NUL included: what :data:`ARGUMENT_LIMIT` bounds."""
    return max((len(argument.encode()) + 1 for argument in arguments), default=0)


def pack_bundle(tree: Path, packed: Path) -> Path:
    """Write into the new folder ``packed`` what a component embeds for the bundle folder ``tree``:
    ``tree`` as one xz archive (:data:`~components.unpack.ARCHIVE`; entries sorted, times and
    owners zeroed, so the same code packs to the same bytes), the loader
    (:mod:`components.unpack`, as :data:`~components.unpack.MODULE`) and a stub ``__init__``
    for each top-level package of ``tree`` (namespace packages too) that hands its import to the
    loader; returns ``packed``."""
    packed.mkdir(parents=True)

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=path.relative_to(tree).as_posix(), recursive=False, filter=plain)
    (packed / unpack.ARCHIVE).write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    loader = Path(unpack.__file__).read_text()
    (packed / f"{unpack.MODULE}.py").write_text(shipped_source(loader))
    for package in sorted(p.name for p in tree.iterdir() if p.is_dir() and any(p.rglob("*.py"))):
        (packed / package).mkdir()
        (packed / package / "__init__.py").write_text(f"import {unpack.MODULE}\n{unpack.MODULE}.replace(__name__)\n")
    return packed


def build_bundle(root: Path = REPO_ROOT, cache: Path | None = None, roots: Iterable[str] | None = None) -> Path:
    """A folder holding the shipped copy of :func:`bundle_files`, made once per code version, with
    its packed form beside it (:func:`packed_bundle`).

    Raises ``ValueError`` when the encoded packed bundle would not fit in one command-line argument.
    """
    digest = code_digest(root, roots)
    made = (cache or Path(tempfile.gettempdir()) / "dinoflow-bundles") / digest[:16]
    if made.is_dir():
        return made / "code"
    made.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=made.parent))
    for path in bundle_files(root, roots):
        destination = staging / "code" / path.relative_to(root)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            destination.write_text(shipped_source(path.read_text()))
        else:
            shutil.copyfile(path, destination)
    size = encoded_size(pack_bundle(staging / "code", staging / "packed"))
    if size > ARGUMENT_LIMIT - HEADROOM:
        shutil.rmtree(staging)
        raise ValueError(
            f"the component code bundle encodes to {size // 1024} KiB, over the "
            f"{(ARGUMENT_LIMIT - HEADROOM) // 1024} KiB that fit in one container argument; "
            f"trim the modules it imports or ship the code in the base image"
        )
    try:
        staging.rename(made)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return made / "code"


def packed_bundle(tree: Path) -> Path:
    """The packed form (:func:`pack_bundle`) of a bundle folder made by :func:`build_bundle`: the
    folder a component embeds."""
    return tree.parent / "packed"
