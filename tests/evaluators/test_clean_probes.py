"""Further test sets (ImageNet-V2, -A, -R, -Sketch's role) scored by the classifiers trained once."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoflow.storage import Storage
from evaluators.classification import FolderImages, _test_split
from evaluators.suite import SuiteConfig, run_suite
from tests.evaluators.test_classification import backbone, write_folders
from tests.evaluators.test_corruptions import counted_test_passes

TASKS = ("knn", "linear", "logreg")


def class_folders(root: Path, name: str, per_class: dict[str, tuple[int, int]], seed: int) -> Path:
    """``root/<name>/<class>/*.png``: a test set's class folders (write_folders' val split)."""
    write_folders(root / f"{name}-made", per_class, seed=seed)
    (root / f"{name}-made" / "val").rename(root / name)
    return root / name


def sets(root: Path) -> str:
    """ImageNet's class folders and two further test sets: one of all its classes, one of two
    (ImageNet-R's role: scored over its own classes); their roots as test_sets."""
    write_folders(root / "in", {"cat": (10, 3), "dog": (10, 3), "fish": (10, 3)})
    v2 = class_folders(root, "imagenetv2", {"cat": (0, 4), "dog": (0, 2), "fish": (0, 3)}, seed=5)
    r = class_folders(root, "imagenet-r", {"dog": (0, 3), "fish": (0, 3)}, seed=6)
    return f"{v2},{r}"


def test_each_test_set_scores_as_a_run_with_it_as_the_test_set(tmp_path: Path) -> None:
    """The independent reference: the suite with ``test_uri`` = that set trains the same k-NN
    bank, probe and logistic regression (same seed, same train features) and scores them there."""
    given = sets(tmp_path)
    model = backbone()
    config = SuiteConfig(tasks=TASKS, data_uri=str(tmp_path / "in"), image_size=28, ks=(5,), test_sets=given)
    report = run_suite(model, config)
    metrics, section = report["metrics"], report["tasks"]["classification"]["test_sets"]
    assert list(section) == ["imagenetv2", "imagenet-r"]  # named by their roots' last parts
    assert [entry["classes"] for entry in section.values()] == [3, 2]
    alone = run_suite(model, dataclasses.replace(config, test_sets=""))["metrics"]
    assert {name: metrics[name] for name in alone} == alone  # val's scores are untouched
    for name, root in zip(section, given.split(",")):
        reference = run_suite(model, dataclasses.replace(config, test_sets="", test_uri=root))["metrics"]
        for task, metric in (("knn", "knn_top1_k5"), ("linear", "linear_top1"), ("logreg", "logreg_top1")):
            assert metrics[f"test_{name}_{task}_top1"] == pytest.approx(reference[metric]), (name, task)
            assert section[name][task] == metrics[f"test_{name}_{task}_top1"] and section[name]["uri"] == root


def test_a_rerun_reads_each_sets_saved_scores_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = sets(tmp_path)
    made = counted_test_passes(monkeypatch)
    config = SuiteConfig(tasks=("knn", "linear"), data_uri=str(tmp_path / "in"), image_size=28, ks=(5,),
                         test_sets=given, work_dir=str(tmp_path / "work"))
    model = backbone()
    first = run_suite(model, config)["metrics"]
    assert made == [9, 6]
    made.clear()
    assert run_suite(model, config)["metrics"] == first and made == []
    other = class_folders(tmp_path / "elsewhere", "imagenetv2", {"cat": (0, 2), "dog": (0, 2), "fish": (0, 2)}, seed=7)
    moved = dataclasses.replace(config, test_sets=f"{other},{tmp_path / 'imagenet-r'}")
    run_suite(model, moved)  # a set of the same name at another root is scored anew, never read from the first's
    assert made == [6, 6]


def test_bad_test_sets_are_refused_before_the_train_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = sets(tmp_path)
    birds = class_folders(tmp_path, "birds", {"cat": (0, 2)}, seed=8)
    (birds / "cat").rename(birds / "bird")  # a class train lacks
    monkeypatch.setattr(FolderImages, "features", lambda *a, **k: pytest.fail("the train pass ran"))
    with pytest.raises(ValueError, match=r"classes \['bird'\] are not among train's 3 class folders"):
        run_suite(backbone(), SuiteConfig(tasks=("knn",), data_uri=str(tmp_path / "in"), image_size=28,
                                          test_sets=f"{given},{birds}"))
    with pytest.raises(ValueError, match="test_sets = .*repeated or bad: val"):
        SuiteConfig(tasks=("knn",), data_uri="/x", test_sets="/a/val,/b/val")
    with pytest.raises(ValueError, match="test_sets .* need knn, linear or logreg on a data_uri of class folders"):
        SuiteConfig(tasks=("seg",), test_sets="/a/v2")
    with pytest.raises(ValueError, match="test_sets .*: further test sets are scored by probes trained on class "
                                         "folders.* holds Fashion-MNIST"):
        run_suite(backbone(), SuiteConfig(tasks=("knn",), data_uri="/usr/share/datasets/fashion-mnist",
                                          train_limit=50, test_limit=10, test_sets=str(tmp_path / "imagenetv2")))


def test_folders_named_by_class_index_are_train_classes_of_that_index(tmp_path: Path) -> None:
    """ImageNet-V2's release names its folders 0-999, the indices of the sorted class names: the
    same images under cat/dog/fish and under 0/1/2 score alike; an index past train's is refused."""
    given = sets(tmp_path)
    named = Path(given.split(",")[0])
    indexed = tmp_path / "imagenetv2-indexed"
    shutil.copytree(named, indexed)
    for index, name in enumerate(("cat", "dog", "fish")):
        (indexed / name).rename(indexed / str(index))
    config = SuiteConfig(tasks=("knn", "linear"), data_uri=str(tmp_path / "in"), image_size=28, ks=(5,),
                         test_sets=f"{named},{indexed}")
    metrics = run_suite(backbone(), config)["metrics"]
    assert metrics["test_imagenetv2_knn_top1"] > 0.8  # the colours' classes: a wrong map would score near 0
    for task in ("knn", "linear"):
        assert metrics[f"test_imagenetv2-indexed_{task}_top1"] == metrics[f"test_imagenetv2_{task}_top1"]
    (indexed / "2").rename(indexed / "3")
    with pytest.raises(ValueError, match=r"classes \['0', '1', '3'\] are not among train's 3 class folders"):
        run_suite(backbone(), config)


def test_index_folders_past_nine_map_by_their_number_not_their_sorted_place(tmp_path: Path) -> None:
    """With 12 classes ImageNet-V2's folders list as 0, 1, 10, 11, 2, ...: each image is labelled
    train's class of its folder's number (an image's key names its folder), never its listing place."""
    classes = tuple(f"n{index:08d}" for index in range(12))
    for index in range(12):
        (tmp_path / str(index)).mkdir()
        Image.fromarray(np.full((8, 8, 3), index * 20, np.uint8)).save(tmp_path / str(index) / "a.png")
    test, remap = _test_split(str(tmp_path), classes, Storage(), image_size=28, limit=0, seed=0)
    labels = {Path(test[row].key).parent.name: int(remap[test[row].label]) for row in range(len(test))}
    assert labels == {str(index): index for index in range(12)}
