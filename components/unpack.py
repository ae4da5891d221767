"""The run-time half of a packed bundle (:func:`components.bundle.pack_bundle`).

Why: KFP embeds a component's folder as gzip inside one command-line argument of at most 128 KiB;
the same code as one xz archive is about 15 % smaller, room that the training stages' bundles
need. A packed folder holds that archive, this module (as :data:`MODULE`) and, for each top-level
package, a two-line ``__init__`` that calls :func:`replace`: the first import of any of them
extracts the archive beside it, puts the extracted folder on ``sys.path`` in the packed
folder's place and swaps the stub for the real package, so every module runs from a real file
(tracebacks, ``__file__`` and the presets read beside the code work as in the checkout). Only
the standard library is used: nothing of dinoflow is importable before this has run.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tarfile
import tempfile

ARCHIVE = "code.tar.xz"  # the bundle's tree, beside this module in the packed folder
FOLDER = "code"  # where it is extracted, beside the archive
MODULE = "dinoflow_unpack"  # this module's name in the packed folder


def unpack(folder: str) -> str:
    """Extract :data:`ARCHIVE` of the packed ``folder`` into ``folder/code`` once (into a staging
    folder renamed into place, so a process that starts meanwhile never sees half of it) and put
    that on ``sys.path`` in place of ``folder`` (whose stubs would otherwise shadow the namespace
    packages of the code); returns it."""
    target = os.path.join(folder, FOLDER)
    if not os.path.isdir(target):
        staging = tempfile.mkdtemp(prefix=".code-", dir=folder)
        with tarfile.open(os.path.join(folder, ARCHIVE), "r:xz") as archive:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links and paths out of the folder
                archive.extractall(staging, filter="data")
            else:
                archive.extractall(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process extracted it first
            shutil.rmtree(staging, ignore_errors=True)
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != folder]
    sys.path.insert(0, target)
    return target


def replace(package: str) -> None:
    """Called by the stub ``__init__`` of top-level ``package``: unpack, then import the real
    package in the stub's place (the import system returns what ``sys.modules`` holds once the
    stub has run)."""
    unpack(os.path.dirname(os.path.abspath(__file__)))
    del sys.modules[package]
    sys.modules[package] = importlib.import_module(package)
