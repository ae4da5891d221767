"""A feature pass in parts: the same features as in one piece, a rerun makes only the missing
parts, parts of other features are refused; on file:// and on the S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinoflow.storage import Storage, join_uri
from evaluators.classification import labelled_images
from evaluators.feature_parts import FeatureParts, backbone_digest
from evaluators.suite import SuiteConfig, run_suite
from tests.evaluators.test_classification import FASHION_MNIST, backbone, write_folders


def _counting(model: torch.nn.Module) -> list[int]:
    """Counts the images ``model`` makes features of (its ``get_intermediate_layers`` calls)."""
    seen: list[int] = []
    run = model.get_intermediate_layers

    def counted(images: torch.Tensor, *args, **kwargs):
        seen.append(len(images))
        return run(images, *args, **kwargs)

    model.get_intermediate_layers = counted  # type: ignore[method-assign]
    return seen


def _assert_same(first, second) -> None:
    for name in ("train_x", "train_y", "test_x", "test_y", "test_images"):
        torch.testing.assert_close(getattr(first, name), getattr(second, name), rtol=0, atol=1e-5)
    torch.testing.assert_close(first.views[0], second.views[0], rtol=0, atol=1e-5)
    assert first.bad == second.bad


def test_a_rerun_makes_only_the_missing_parts(storage_root: tuple[Storage, str], tmp_path: Path) -> None:
    storage, root = storage_root
    write_folders(tmp_path, {"cat": (8, 3), "dog": (7, 4), "fish": (6, 3)})
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    images = labelled_images(str(tmp_path), "folder", Storage(), image_size=28)
    model = backbone()
    whole = images.features(model, views=True, batch_size=2)
    parts = FeatureParts(storage, join_uri(root, "parts"), {"backbone_sha256": backbone_digest(model)}, rows=5)
    in_parts = images.features(model, views=True, batch_size=2, parts=parts)
    _assert_same(in_parts, whole)
    assert whole.bad == {"train": 1, "test": 0} and len(in_parts.test_images) == 10  # from both parts
    (tmp_path / "train" / "fish" / "broken.png").write_bytes(b"")  # 2 of 23: over the limit, for the split
    with pytest.raises(ValueError, match="2 of 23 images \\(8.7%\\) could not be decoded"):
        labelled_images(str(tmp_path), "folder", Storage(), image_size=28).features(
            model, parts=FeatureParts(storage, join_uri(root, "more"), {}, rows=5))
    (tmp_path / "train" / "fish" / "broken.png").unlink()
    assert [len(storage.list(join_uri(root, "parts", split))) for split in ("train", "test")] == [5, 2]

    storage.delete(join_uri(root, "parts", "train", "part-00000.safetensors"))
    seen = _counting(model)
    resumed = images.features(model, views=True, batch_size=2, parts=parts)
    assert sum(seen) == 5  # train's first 5 rows: the one part lost
    _assert_same(resumed, whole)

    other = FeatureParts(storage, join_uri(root, "parts"), {"backbone_sha256": "another"}, rows=5)
    with pytest.raises(ValueError, match="holds features of another pass \\(it differs in backbone_sha256\\)"):
        images.features(model, views=True, parts=other)


def test_fashion_mnist_in_parts_and_the_suite_resuming(tmp_path: Path) -> None:
    """Fashion-MNIST's pass in parts gives its features; the suite's ``work_dir`` holds the
    parts for its backbone and settings and reuses them on a rerun (no feature computed again),
    with the same report; another backbone is refused."""
    model = backbone()
    images = labelled_images(FASHION_MNIST, "fashion_mnist", Storage(), train_limit=50, test_limit=20)
    parts = FeatureParts(Storage(), str(tmp_path / "fm"), {"what": "fashion-mnist"}, rows=16)
    _assert_same(images.features(model, views=True, parts=parts), images.features(model, views=True))
    assert len(list((tmp_path / "fm" / "train").iterdir())) == 4  # 50 rows in parts of 16

    config = SuiteConfig(tasks=("knn", "linear"), data_uri=FASHION_MNIST, train_limit=60, test_limit=20,
                         work_dir=str(tmp_path / "suite"))
    first = run_suite(model, config)["metrics"]
    seen = _counting(model)
    again = run_suite(model, config)["metrics"]
    assert again == first and sum(seen) == 0  # (the attention figures read the attention, not the features)
    other = backbone()
    with torch.no_grad():
        other.norm.bias.add_(0.1)
    with pytest.raises(ValueError, match="differs in backbone_sha256"):
        run_suite(other, config)


def test_the_suite_refuses_parts_of_class_folders_listed_otherwise(tmp_path: Path) -> None:
    """An image added to a class folder between a pass and its rerun: the saved parts (of the
    former listing's rows) are refused, not joined with the new listing's."""
    write_folders(tmp_path, {"cat": (6, 3), "dog": (6, 3)})
    config = SuiteConfig(tasks=("knn",), data_uri=str(tmp_path), image_size=28, work_dir=str(tmp_path / "work"))
    model = backbone()
    run_suite(model, config)
    first = min((tmp_path / "train" / "cat").iterdir())
    (tmp_path / "train" / "cat" / f"added{first.suffix}").write_bytes(first.read_bytes())
    with pytest.raises(ValueError, match="holds features of another pass \\(it differs in images\\)"):
        run_suite(model, config)


def test_the_pass_joins_its_parts_as_they_come(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a parts folder too, the pass runs in parts (of ``PART_ROWS`` images) copied into
    the split's features as each is made: when a part is made, at most the one before it is still
    held (ImageNet's probe views gathered whole, then concatenated, took twice their 26 GB), and
    the features are those of a pass in one piece."""
    import weakref

    import evaluators.classification as classification
    import evaluators.feature_parts as feature_parts

    write_folders(tmp_path, {"cat": (8, 3), "dog": (7, 4), "fish": (6, 3)})
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not an image")  # a part one row short
    images = labelled_images(str(tmp_path), "folder", Storage(), image_size=28)
    model = backbone()
    whole = images.features(model, views=True, batch_size=2)
    made = classification.FolderImages._part
    parts: list[weakref.ref] = []
    held: list[int] = []

    def recorded(self, *args):
        held.append(sum(part() is not None for part in parts))
        out = made(self, *args)
        parts.append(weakref.ref(out["features"]))
        return out

    monkeypatch.setattr(classification.FolderImages, "_part", recorded)
    monkeypatch.setattr(feature_parts, "PART_ROWS", 3)
    pieces = images.features(model, views=True, batch_size=2)
    _assert_same(pieces, whole)
    assert len(held) == 8 + 4 and max(held) <= 1  # 22 train images in parts of 3, 10 test
    with pytest.raises(ValueError, match="a piece of \\[2, 3\\] rows after 0: its tensors must agree"):
        feature_parts.join_rows([{"a": torch.zeros(2), "b": torch.zeros(3)}], 5)
    with pytest.raises(ValueError, match="a piece of \\[3\\] rows after 3: its tensors must agree, 5 at most"):
        feature_parts.join_rows([{"a": torch.zeros(3)}] * 2, 5)


def test_the_memory_benchmark_runs_both_ways() -> None:
    """``benchmarks/feature_memory.py`` (its figures are read, not asserted): both modes report."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "feature_memory.py"
    out = subprocess.run([sys.executable, str(script), "--rows", "3000", "--dim", "8", "--part-rows", "1000"],
                         capture_output=True, text=True, check=True).stdout
    assert [line.split(":")[0].strip() for line in out.splitlines()] == ["gathered", "joined"]
    assert "the view (3000, 16)" in out
