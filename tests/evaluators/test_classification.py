"""k-NN and linear benchmarks on folders of class folders (ImageNet's layout), beside Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.storage import Storage
from evaluators.classification import data_kind, labelled_images
from evaluators.features import to_model_input
from evaluators.knn import knn_predict
from evaluators.suite import SuiteConfig, run_suite
from trainer.data.datasets import read_image
from trainer.models.vit import build_vit

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CLASSES = ("cat", "dog", "fish")


def write_folders(root: Path, per_class: dict[str, tuple[int, int]], seed: int = 0) -> None:
    """``root/{train,val}/<class>/*.png``: each class a colour with noise, in varied shapes."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(CLASSES):
        colour = np.eye(3)[index] * 200 + 30
        for split, count in zip(("train", "val"), per_class.get(name, (0, 0))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                height, width = rng.integers(30, 60, size=2)
                noise = rng.normal(0, 40, (height, width, 3))
                Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                     layerscale_init=1.0).eval()


def expected_features(model: torch.nn.Module, files: list[Path], size: int) -> torch.Tensor:
    """The original's evaluation transform written out: shorter side to size / 0.875, centre crop."""
    load = round(size / 0.875)
    offset = (load - size) // 2
    pixels = torch.stack([read_image(f.read_bytes(), load)[:, offset:offset + size, offset:offset + size]
                          for f in files])
    with torch.no_grad():
        return model(to_model_input(pixels, patch_size=7))


def test_class_folders_give_the_features_and_labels_of_each_image(tmp_path: Path) -> None:
    """val lacks a class: its labels are indices into train's classes, not its own."""
    write_folders(tmp_path, {"cat": (4, 0), "dog": (5, 2), "fish": (3, 3)})
    model = backbone()
    data = labelled_images(str(tmp_path), "auto", Storage(), image_size=28).features(model, batch_size=4)
    assert data.classes == CLASSES and data.pixels is None and data.bad == {"train": 0, "test": 0}
    train_files = sorted((tmp_path / "train").rglob("*.png"))
    val_files = sorted((tmp_path / "val").rglob("*.png"))
    torch.testing.assert_close(data.train_x, expected_features(model, train_files, 28), rtol=0, atol=1e-5)
    torch.testing.assert_close(data.test_x, expected_features(model, val_files, 28), rtol=0, atol=1e-5)
    assert data.train_y.tolist() == [0] * 4 + [1] * 5 + [2] * 3
    assert data.test_y.tolist() == [1, 1, 2, 2, 2]


def test_a_limit_keeps_a_random_subset_of_every_class_and_bad_images_are_counted(tmp_path: Path) -> None:
    write_folders(tmp_path, {"cat": (20, 4), "dog": (20, 4), "fish": (20, 4)})
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    model = backbone()
    data = labelled_images(str(tmp_path), "folder", Storage(), train_limit=61, test_limit=6,
                           image_size=28).features(model)
    assert data.bad == {"train": 1, "test": 0} and len(data.train_y) == 60 and len(data.test_y) == 6
    subset = labelled_images(str(tmp_path), "folder", Storage(), train_limit=9, image_size=28).features(model)
    assert len(subset.train_y) <= 9 and len(set(subset.train_y.tolist())) == 3  # not the first class's 9
    for index in range(6):
        (tmp_path / "val" / "fish" / f"broken{index}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"6 of 18 images \(33\.3%\) could not be decoded"):
        labelled_images(str(tmp_path), "folder", Storage(), image_size=28).features(model)


def test_the_suite_scores_class_folders(tmp_path: Path) -> None:
    """k-NN and the linear probe on class folders; the report names the classes; k-NN's accuracy
    is the weighted vote's over the same features, computed here."""
    write_folders(tmp_path, {"cat": (10, 4), "dog": (10, 4), "fish": (10, 4)})
    model = backbone()
    config = SuiteConfig(tasks=("knn", "linear"), data_uri=str(tmp_path), image_size=28, ks=(5,))
    report = run_suite(model, config, pictures=tmp_path / "pictures")
    train_x, train_y, test_x, test_y = report["features"]
    predicted = knn_predict(train_x, train_y, test_x, k=5, temperature=0.07, num_classes=3)
    assert report["metrics"]["knn_top1_k5"] == pytest.approx((predicted == test_y).float().mean().item())
    assert report["metrics"]["knn_top1_k5"] > 0.9  # the colours separate even a random backbone's features
    assert 0 <= report["metrics"]["linear_top1"] <= 1 and "pixels_knn_top1_k5" not in report["metrics"]
    assert report["tasks"]["classification"]["classes"] == list(CLASSES)
    # the attention figures on the first test images as the backbone saw them; no foreground to score
    assert 0 < report["metrics"]["cls_attention_on_patches"] < 1 and "attention_jaccard" not in report["metrics"]
    assert (tmp_path / "pictures" / "attention_maps.png").read_bytes()[:4] == b"\x89PNG"


def test_data_kinds_and_bad_layouts_are_named(tmp_path: Path) -> None:
    storage = Storage()
    assert data_kind(FASHION_MNIST, storage) == "fashion_mnist"
    write_folders(tmp_path / "folders", {"cat": (2, 1), "dog": (2, 1)})
    assert data_kind(str(tmp_path / "folders"), storage) == "folder"
    with pytest.raises(ValueError, match="holds neither Fashion-MNIST .* nor train/<class>/ image folders"):
        data_kind(str(tmp_path / "nothing"), storage)
    with pytest.raises(ValueError, match="image_size 30 is not a positive multiple of the patch size 7"):
        labelled_images(str(tmp_path / "folders"), "auto", storage, image_size=30).features(backbone())
    (tmp_path / "folders" / "val" / "bird").mkdir()
    Image.new("RGB", (30, 30)).save(tmp_path / "folders" / "val" / "bird" / "0.png")
    with pytest.raises(ValueError, match=r"classes \['bird'\] are not among train's 2 class folders"):
        labelled_images(str(tmp_path / "folders"), "auto", storage, image_size=28)
    with pytest.raises(ValueError, match="unknown data kind 'csv'"):
        SuiteConfig(data_uri="x", data_kind="csv")  # type: ignore[arg-type]


def test_the_probe_views_are_the_originals_and_the_best_on_held_out_is_reported(tmp_path: Path) -> None:
    """The four inputs of the original's linear grid, checked against the backbone's own blocks;
    the report holds the probe of the view that wins on the held-out split, recomputed here."""
    from evaluators.classification import PROBE_VIEWS, view
    from evaluators.report import classification_report
    from evaluators.linear import LinearProbeConfig, linear_probe

    write_folders(tmp_path, {"cat": (12, 4), "dog": (12, 4), "fish": (12, 4)})
    model = build_vit("vit_small", patch_size=7, embed_dim=32, depth=5, num_heads=2, img_size=28,
                      layerscale_init=1.0).eval()
    data = labelled_images(str(tmp_path), "folder", Storage(), image_size=28).features(model, views=True)
    train_files = sorted((tmp_path / "train").rglob("*.png"))
    load = round(28 / 0.875)
    pixels = torch.stack([read_image(f.read_bytes(), load)[:, 2:30, 2:30] for f in train_files])
    with torch.no_grad():
        blocks = model.get_intermediate_layers(to_model_input(pixels, patch_size=7), n=4, return_class_token=True)
    cls = [c for _, c in blocks]  # the last 4 blocks' CLS, each through the final norm
    mean = blocks[-1][0].mean(dim=1)
    expected = {"last1": cls[-1], "last1+avgpool": torch.cat([cls[-1], mean], 1), "last4": torch.cat(cls, 1),
                "last4+avgpool": torch.cat([*cls, mean], 1)}
    for name in PROBE_VIEWS:
        torch.testing.assert_close(view(data.views[0], name, 32), expected[name], rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(data.train_x, cls[-1], rtol=0, atol=1e-5)
    config = LinearProbeConfig(epochs=3)
    report = classification_report(data, (5,), 0.07, config)["linear"]
    assert set(report["val_accuracy_by_view"]) == set(PROBE_VIEWS)
    assert report["val_accuracy"] == max(report["val_accuracy_by_view"].values())
    alone = linear_probe(view(data.views[0], report["view"], 32), data.train_y, view(data.views[1], report["view"], 32),
                         data.test_y, config, num_classes=3)
    assert report["test_accuracy"] == alone.test_accuracy
    with pytest.raises(ValueError, match="needs the features taken with views=True"):
        classification_report(labelled_images(str(tmp_path), "folder", Storage(), image_size=28).features(model),
                              (5,), 0.07, config)


def test_half_precision_features_are_the_fp32_ones_rounded(tmp_path: Path) -> None:
    """``precision`` bf16: the backbone runs under autocast (as the original evaluates), its features
    near the fp32 ones but not equal (the autocast is on); an unknown precision is named."""
    write_folders(tmp_path, {"cat": (4, 2), "dog": (4, 2)})
    images = labelled_images(str(tmp_path), "folder", Storage(), image_size=28)
    model = backbone()
    fp32 = images.features(model)
    bf16 = images.features(model, amp_dtype=torch.bfloat16)
    assert fp32.train_x.dtype == bf16.train_x.dtype == torch.float32
    torch.testing.assert_close(bf16.train_x, fp32.train_x, rtol=0.05, atol=0.05)
    assert not torch.equal(bf16.train_x, fp32.train_x)
    config = SuiteConfig(tasks=("knn",), data_uri=str(tmp_path), image_size=28, ks=(3,), precision="bf16")
    assert run_suite(model, config)["metrics"]["knn_top1_k3"] == 1.0  # the colours separate
    with pytest.raises(ValueError, match="unknown precision 'int8'; allowed: fp32, bf16, fp16"):
        SuiteConfig(data_uri="x", precision="int8")


def test_a_separate_test_set_of_fewer_classes_is_scored_over_its_own(tmp_path: Path) -> None:
    """``test_uri`` (ImageNet-R beside ImageNet's train split): its images are the test set, its
    labels train's indices; holding 2 of 3 classes, k-NN votes among those classes' train images
    and the probe's prediction is the better of their two logits: never worse than over all three,
    and each figure recomputed here by hand."""
    import dataclasses

    from evaluators.report import classification_report, knn_bank
    from evaluators.linear import LinearProbeConfig
    from evaluators.report import knn_accuracies

    write_folders(tmp_path / "in", {"cat": (10, 0), "dog": (10, 0), "fish": (10, 0)})
    write_folders(tmp_path / "r", {"dog": (0, 6), "fish": (0, 5)}, seed=1)  # val/ only: the test set
    model = backbone()
    images = labelled_images(str(tmp_path / "in"), "folder", Storage(), image_size=28,
                             test_uri=str(tmp_path / "r" / "val"))
    data = images.features(model, views=True)
    assert data.test_y.tolist() == [1] * 6 + [2] * 5 and data.test_classes.tolist() == [1, 2]
    test_files = sorted((tmp_path / "r" / "val").rglob("*.png"))
    torch.testing.assert_close(data.test_x, expected_features(model, test_files, 28), rtol=0, atol=1e-5)
    bank_x, bank_y = knn_bank(data)
    assert bank_y.tolist() == [1] * 10 + [2] * 10
    torch.testing.assert_close(bank_x, data.train_x[10:])
    report = classification_report(data, (5,), 0.07, LinearProbeConfig(epochs=2))
    assert report["test_classes"] == 2
    assert report["knn"] == knn_accuracies(data.train_x[10:], data.train_y[10:], data.test_x, data.test_y, (5,),
                                           0.07, 3)
    whole = classification_report(dataclasses.replace(data, test_classes=None), (5,), 0.07, LinearProbeConfig(epochs=2))
    assert "test_classes" not in whole
    for name in report["linear"]["val_accuracy_by_view"]:  # trained and picked alike: only the scoring differs
        assert report["linear"]["val_accuracy_by_view"][name] == whole["linear"]["val_accuracy_by_view"][name]
    assert report["linear"]["test_accuracy"] >= whole["linear"]["test_accuracy"]
    same = labelled_images(str(tmp_path / "in"), "folder", Storage(), image_size=28,
                           test_uri=str(tmp_path / "in" / "train")).features(model)
    assert same.test_classes is None  # every train class there: nothing to restrict
    with pytest.raises(ValueError, match="test_uri .* is a test set of class folders, for a train split of class"):
        labelled_images(FASHION_MNIST, "auto", Storage(), test_uri=str(tmp_path / "r" / "val"))


def test_imagenets_validation_split_as_released_is_read_by_the_list_beside_it(tmp_path: Path) -> None:
    """val/ flat as ILSVRC2012_img_val.tar extracts, the classes from Kaggle's LOC_val_solution.csv
    (rows in any order) or from the devkit's ground truth through meta.mat, whose ILSVRC2012 IDs are
    not the sorted-WNID order of train's folders: the same labels, each image's features its own."""
    from scipy.io import savemat

    wnids = ("n01440764", "n01443537", "n02119789")  # train's sorted class folders
    rng = np.random.default_rng(0)
    for index, wnid in enumerate(wnids):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for i in range(2):
            colour = np.eye(3)[index] * 200 + 30
            Image.fromarray(np.clip(colour + rng.normal(0, 40, (36, 44, 3)), 0, 255).astype(np.uint8)).save(
                tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG")
    truth = [2, 0, 1, 2, 1, 0]  # the n-th validation image's class (an index into wnids)
    (tmp_path / "val").mkdir()
    for n, index in enumerate(truth, 1):
        colour = np.eye(3)[index] * 200 + 30
        Image.fromarray(np.clip(colour + rng.normal(0, 40, (40, 30, 3)), 0, 255).astype(np.uint8)).save(
            tmp_path / "val" / f"ILSVRC2012_val_{n:08d}.JPEG")
    rows = [f"ILSVRC2012_val_{n:08d},{wnids[index]} 1 2 30 40 {wnids[index]} 3 4 20 20"
            for n, index in enumerate(truth, 1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")
    model = backbone()
    val_files = sorted((tmp_path / "val").glob("*.JPEG"))

    def read() -> tuple[list[int], torch.Tensor]:
        data = labelled_images(str(tmp_path), "auto", Storage(), image_size=28).features(model, batch_size=4)
        assert data.classes == wnids
        return data.test_y.tolist(), data.test_x

    labels, features = read()
    assert labels == truth
    torch.testing.assert_close(features, expected_features(model, val_files, 28), rtol=0, atol=1e-5)
    (tmp_path / "LOC_val_solution.csv").unlink()
    ids = {"n02119789": 1, "n01440764": 2, "n01443537": 3}  # the devkit's IDs: not the sorted order
    fields = [(name, "O") for name in ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children")]
    synsets = np.array([(ids[w], w, w, "", 0) for w in wnids] + [(1001, "n00001740", "entity", "", 3)],
                       dtype=fields).reshape(1, -1)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[wnids[i]]}\n" for i in truth))
    assert read()[0] == truth
    (data / "ILSVRC2012_validation_ground_truth.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val holds ImageNet's validation images as released \(flat\), but "
                                                r"neither LOC_val_solution.csv nor ILSVRC2012_devkit_t12/data/"):
        labelled_images(str(tmp_path), "auto", Storage(), image_size=28)
