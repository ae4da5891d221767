"""The code bundle shipped inside every component: complete, importable, small enough, versioned."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from components.bundle import (
    ARGUMENT_LIMIT,
    EXCLUDED,
    HEADROOM,
    PACKAGES,
    REPO_ROOT,
    build_bundle,
    code_digest,
    encoded_size,
)


def test_bundle_holds_the_packages_without_docstrings_and_imports_on_its_own(tmp_path: Path) -> None:
    bundle = build_bundle(cache=tmp_path)
    assert sorted(p.name for p in bundle.iterdir()) == sorted(PACKAGES)
    assert not list(bundle.rglob("__pycache__")) and (bundle / "configs" / "pretrain" / "tiny.yaml").is_file()
    engine = (bundle / "trainer" / "engine.py").read_text()
    assert ast.get_docstring(ast.parse(engine)) is None
    shipped = sum(len(p.read_bytes()) for p in bundle.rglob("*.py"))
    original = sum(len((REPO_ROOT / p.relative_to(bundle)).read_bytes()) for p in bundle.rglob("*.py"))
    assert shipped < 0.8 * original
    # a fresh interpreter with only the bundle on its path (not the checkout) loads a stage and a preset
    script = ("import sys; sys.path.insert(0, sys.argv[1]);"
              "import components.pretrain as p, components.curate, trainer.engine as e;"
              "from dinoflow.config import PretrainConfig, load_config;"
              "assert p.__file__.startswith(sys.argv[1]) and e.__file__.startswith(sys.argv[1]);"
              "print(load_config(PretrainConfig, 'tiny').model.embed_dim)")
    out = subprocess.run([sys.executable, "-c", script, str(bundle)], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert out.stdout.strip() == "128"
    assert encoded_size(bundle) < ARGUMENT_LIMIT - HEADROOM


def test_no_shipped_module_imports_a_module_left_out(tmp_path: Path) -> None:
    """Not even lazily, inside a function: the :data:`EXCLUDED` modules are not needed by any stage."""
    bundle = build_bundle(cache=tmp_path)
    left_out = {e.removesuffix(".py").replace("/", ".") for e in EXCLUDED}
    assert not any((bundle / e).exists() for e in EXCLUDED)
    for path in bundle.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            assert not left_out & set(names), f"{path.relative_to(bundle)} imports {left_out & set(names)}"


def test_bundle_is_made_once_per_code_version(tmp_path: Path) -> None:
    assert build_bundle(cache=tmp_path) == build_bundle(cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1


def test_code_digest_follows_the_sources(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for package in PACKAGES:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(f'"""{package}."""\n')
    before = code_digest(root)
    (root / "trainer" / "__init__.py").write_text('"""trainer, changed."""\n')
    assert code_digest(root) != before


def test_an_oversized_bundle_is_refused_with_the_limit_named(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for package in PACKAGES:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    rng_text = "".join(f"V{i} = {hash((i, 'x')) ** 3}\n" for i in range(12000))  # incompressible enough
    (root / "trainer" / "big.py").write_text(rng_text)
    with pytest.raises(ValueError, match="KiB that fit in one container argument"):
        build_bundle(root, cache=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/trainer")) if (tmp_path / "cache").exists() else True
