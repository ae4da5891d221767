"""The code bundle shipped inside every component: complete, importable, small enough, versioned."""

from __future__ import annotations

import ast
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.bundle import (
    ARGUMENT_LIMIT,
    HEADROOM,
    PACKAGES,
    REPO_ROOT,
    build_bundle,
    bundle_files,
    code_digest,
    encoded_size,
    import_closure,
    imported_modules,
    longest_argument,
    pack_bundle,
    packed_bundle,
)
from components.definitions import STAGES, stage_bundle


def test_bundle_holds_the_packages_without_docstrings_or_annotations_and_imports_on_its_own(tmp_path: Path) -> None:
    bundle = build_bundle(cache=tmp_path, roots=["components.pretrain"])
    assert sorted(p.name for p in bundle.iterdir()) == sorted(set(PACKAGES) - {"curation"})  # not imported
    assert not list(bundle.rglob("__pycache__")) and (bundle / "configs" / "pretrain" / "tiny.yaml").is_file()
    engine = (bundle / "trainer" / "engine.py").read_text()
    assert ast.get_docstring(ast.parse(engine)) is None
    # functions lose their annotations, classes keep theirs (pydantic's fields: the preset loads below)
    assert "def ema_update(teacher, student, momentum):" in engine and " -> " not in engine
    assert "    embed_dim: int | None = Field(" in (bundle / "dinoflow" / "config.py").read_text()
    shipped = sum(len(p.read_bytes()) for p in bundle.rglob("*.py"))
    original = sum(len((REPO_ROOT / p.relative_to(bundle)).read_bytes()) for p in bundle.rglob("*.py"))
    assert shipped < 0.8 * original
    # a fresh interpreter with only the bundle on its path (not the checkout) loads a stage and a preset
    script = ("import sys; sys.path.insert(0, sys.argv[1]);"
              "import components.pretrain as p, trainer.engine as e;"
              "from dinoflow.config import PretrainConfig, load_config;"
              "assert p.__file__.startswith(sys.argv[1]) and e.__file__.startswith(sys.argv[1]);"
              "print(load_config(PretrainConfig, 'tiny').model.embed_dim)")
    out = subprocess.run([sys.executable, "-c", script, str(bundle)], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert out.stdout.strip() == "128"


def test_packed_bundle_imports_on_its_own_from_real_files(tmp_path: Path) -> None:
    """The folder a component embeds (the bundle as one xz archive, the loader, a stub per package):
    a fresh interpreter with only a copy of it on its path imports a stage and reads a preset, every
    module of ours from the extracted files (the stubs replaced); a second process reuses the
    extraction; the same tree packs to the same bytes."""
    tree = build_bundle(cache=tmp_path / "cache", roots=["components.pretrain"])
    packed = tmp_path / "task"
    shutil.copytree(packed_bundle(tree), packed)
    stubs = [p.name for p in packed.iterdir() if p.is_dir()]  # each package with Python files, namespaces too
    assert sorted(stubs) == sorted(set(PACKAGES) - {"curation", "configs"})
    assert sorted(p.name for p in packed.iterdir() if p.is_file()) == ["code.tar.xz", "dinoflow_unpack.py"]
    script = ("import sys; sys.path.insert(0, sys.argv[1]);"
              "import components.pretrain, trainer.engine;"
              "from dinoflow.config import PretrainConfig, load_config;"
              f"ours = [m for n, m in sys.modules.items() if n.split('.')[0] in {PACKAGES!r}];"
              "where = [m.__file__ or list(m.__path__)[0] for m in ours];"  # a namespace package has no file
              "assert ours and all(f.startswith(sys.argv[1] + '/code/') for f in where), where;"
              "print(len(ours), load_config(PretrainConfig, 'tiny').model.embed_dim)")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script, str(packed)], capture_output=True, text=True,
                             cwd=tmp_path, check=True)
        assert out.stdout.split()[1] == "128" and int(out.stdout.split()[0]) > 20
    assert [p.name for p in packed.iterdir() if p.name.startswith(".code-")] == []  # no staging left
    shipped = {p.relative_to(packed / "code") for p in (packed / "code").rglob("*") if p.is_file()}
    assert shipped == {p.relative_to(tree) for p in tree.rglob("*") if p.is_file()}
    again = pack_bundle(tree, tmp_path / "again")
    assert (again / "code.tar.xz").read_bytes() == (packed / "code.tar.xz").read_bytes()


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.__name__)
def test_each_stage_bundle_fits_one_container_argument(stage) -> None:
    """What KFP embeds is each component's own bundle (its import closure) packed, so that is what
    must fit; the largest (distill, pretrain) hold most of ``trainer``, where packing saves most."""
    tree = stage_bundle(stage)
    packed = encoded_size(packed_bundle(tree))
    assert packed < ARGUMENT_LIMIT - HEADROOM
    if stage.__name__ in ("pretrain", "distill"):
        assert packed < 0.9 * encoded_size(tree)


def test_each_component_program_fits_one_argument_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact figure, from the components KFP makes: each one's longest container argument (its
    program, the encoded bundle inside) is under the limit, and the bundle's own check leaves the
    program's part room enough (``HEADROOM``); a limit below the largest is refused naming the stage."""
    import components.definitions as definitions

    def sizes() -> dict[str, int]:
        built = vars(definitions.build_components())
        return {name: longest_argument([*c.component_spec.implementation.container.command,
                                        *c.component_spec.implementation.container.args]) for name, c in built.items()}

    measured = sizes()
    for stage in STAGES:
        bundle = encoded_size(packed_bundle(stage_bundle(stage)))
        assert bundle < measured[stage.__name__] < min(ARGUMENT_LIMIT, bundle + HEADROOM), stage.__name__
    largest = max(measured, key=measured.__getitem__)
    monkeypatch.setattr(definitions, "ARGUMENT_LIMIT", measured[largest] - 1)
    with pytest.raises(ValueError, match=f"the {largest} component's program is .* KiB, over the"):
        sizes()


def test_imported_modules_sees_lazy_and_relative_imports() -> None:
    source = ("import a.b\nfrom c import d\nfrom . import e\nfrom ..f import g\n"
              "def h():\n    from trainer import engine\n")
    assert imported_modules(source, "p.q.r") == {"a.b", "c", "c.d", "p.q", "p.q.e", "p.f", "p.f.g",
                                                  "trainer", "trainer.engine"}
    assert "p.q.r.e" in imported_modules("from . import e\n", "p.q.r", is_package=True)


def test_closure_follows_imports_transitively_with_packages(tmp_path: Path) -> None:
    for name, text in {"trainer/__init__.py": "", "trainer/a.py": "def f():\n    from trainer.sub import b\n",
                       "trainer/sub/__init__.py": "", "trainer/sub/b.py": "import numpy\nfrom dinoflow import c\n",
                       "trainer/unused.py": "", "dinoflow/__init__.py": "", "dinoflow/c.py": ""}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    shipped = {p.relative_to(tmp_path).as_posix() for p in import_closure(["trainer.a"], tmp_path)}
    assert shipped == {"trainer/__init__.py", "trainer/a.py", "trainer/sub/__init__.py", "trainer/sub/b.py",
                       "dinoflow/__init__.py", "dinoflow/c.py"}


def test_presets_ship_only_with_the_stages_that_read_them(tmp_path: Path) -> None:
    """A bundle holds configs/*.yaml only when a shipped module imports a preset reader
    (load_config and its kin); importing dinoflow.config for its types alone ships none; the
    host's YAML (the demo's settings, the pipelines' parameter sets) ships with no stage."""
    shipped = {stage.__name__ for stage in STAGES if list(stage_bundle(stage).rglob("*.yaml"))}
    assert shipped == {"pretrain", "distill", "finetune"}
    pretrain = stage_bundle(next(stage for stage in STAGES if stage.__name__ == "pretrain"))
    presets = {p.relative_to(pretrain).as_posix() for p in pretrain.rglob("*.yaml")}
    assert "configs/pretrain/tiny.yaml" in presets and "configs/finetune/finetune-tiny.yaml" in presets
    assert not [p for p in presets if p == "configs/demo.yaml" or p.startswith("configs/pipelines/")]
    files = {"dinoflow/__init__.py": "", "dinoflow/config.py": "def load_config():\n    pass\n",
             "components/__init__.py": "", "components/reads.py": "from dinoflow.config import load_config\n",
             "components/types.py": "import dinoflow.config\n", "configs/x/p.yaml": "a: 1\n",
             "configs/pipelines/run.yaml": "a: 1\n", "configs/demo.yaml": "a: 1\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert [p for p in bundle_files(tmp_path, ["components.reads"]) if p.suffix == ".yaml"] == [
        tmp_path / "configs/x/p.yaml"]
    assert len([p for p in bundle_files(tmp_path) if p.suffix == ".yaml"]) == 3
    assert not [p for p in bundle_files(tmp_path, ["components.types"]) if p.suffix == ".yaml"]


@pytest.mark.parametrize("func", STAGES, ids=lambda f: f.__name__)
def test_each_stage_bundle_is_import_complete_and_fits(func) -> None:
    """Every module a shipped file imports (even lazily) is shipped too, the stage imports from a
    fresh interpreter with only its bundle on the path, and the bundle fits its argument."""
    bundle = stage_bundle(func)
    assert encoded_size(packed_bundle(bundle)) < ARGUMENT_LIMIT - HEADROOM
    for path in bundle.rglob("*.py"):
        module = ".".join(path.relative_to(bundle).with_suffix("").parts).removesuffix(".__init__")
        for name in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            source = REPO_ROOT.joinpath(*name.split("."))
            for candidate in (source.with_suffix(".py"), source / "__init__.py"):
                if name.split(".")[0] in PACKAGES and candidate.is_file():
                    assert (bundle / candidate.relative_to(REPO_ROOT)).is_file(), f"{path} imports {name}"
    stage_modules = sorted(m for m in imported_modules(inspect.getsource(func))
                           if m.startswith("components.") and REPO_ROOT.joinpath(*m.split(".")).with_suffix(".py").is_file())
    script = ("import sys, importlib; sys.path.insert(0, sys.argv[1]);"
              "[importlib.import_module(m) for m in sys.argv[2:]];"
              f"ours = [m for n, m in sys.modules.items() if n.split('.')[0] in {PACKAGES!r} and getattr(m, '__file__', None)];"
              "outside = [m.__file__ for m in ours if not m.__file__.startswith(sys.argv[1])];"
              "assert ours and not outside, outside")
    subprocess.run([sys.executable, "-c", script, str(bundle), *stage_modules], check=True, cwd=bundle.parent)


def test_files_handed_over_by_path_are_shipped_with_their_module() -> None:
    register, = (stage_bundle(f) for f in STAGES if f.__name__ == "register")
    assert (register / "trainer" / "models" / "mlflow_entry.py").is_file()


def test_stage_bundles_leave_out_what_the_stage_cannot_run() -> None:
    pretrain, = (stage_bundle(f) for f in STAGES if f.__name__ == "pretrain")
    assert (pretrain / "trainer" / "engine.py").is_file() and not (pretrain / "curation").exists()
    assert not (pretrain / "trainer" / "models" / "onnx_export.py").exists()


def test_bundle_is_made_once_per_code_version(tmp_path: Path) -> None:
    assert build_bundle(cache=tmp_path, roots=["components.ingest"]) == build_bundle(cache=tmp_path, roots=["components.ingest"])
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
    assert not list((tmp_path / "cache").iterdir())  # nothing half-made is left to be taken for a bundle
