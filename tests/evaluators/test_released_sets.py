"""The fine-grained sets read as released: each release's lists in miniature, and the suite on one."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from dinoflow.storage import Storage
from evaluators import released_sets
from evaluators.classification import labelled_images, release_images
from evaluators.released_sets import RELEASES, read_release, release_at
from evaluators.suite import SuiteConfig, run_suite
from tests.evaluators.test_classification import backbone

TRAIN, TEST = 3, 2  # images of each class in each split
Expected = tuple[tuple[str, ...], set[tuple[str, str]], set[tuple[str, str]]]  # classes, (path, class) per split


def picture(path: Path, label: int, rng: np.random.Generator) -> None:
    """A small JPEG of the class's colour with noise (a classifier of colours tells the classes apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = np.eye(3)[label % 3] * 200 + 30
    Image.fromarray(np.clip(colour + rng.normal(0, 30, (36, 44, 3)), 0, 255).astype(np.uint8)).save(path)


def splits_of(classes: tuple[str, ...]) -> list[tuple[int, str, int]]:
    """``(class index, split, number)`` of every image: TRAIN then TEST of each class, in class order."""
    return [(c, split, n) for c in range(len(classes))
            for split, count in (("train", TRAIN), ("test", TEST)) for n in range(count)]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def food101(root: Path, rng: np.random.Generator) -> Expected:
    classes = ("apple_pie", "baby_back_ribs", "baklava")
    lists: dict[str, list[str]] = {"train": [], "test": []}
    expected: dict[str, set] = {"train": set(), "test": set()}
    for c, split, n in splits_of(classes):
        stem = f"{classes[c]}/{100 + n + (10 if split == 'test' else 0)}"
        picture(root / "images" / f"{stem}.jpg", c, rng)
        lists[split].append(stem)
        expected[split].add((f"images/{stem}.jpg", classes[c]))
    write(root, {"meta/classes.txt": "\n".join(classes) + "\n",
                 **{f"meta/{s}.txt": "\n".join(lines) + "\n" for s, lines in lists.items()}})
    return classes, expected["train"], expected["test"]


def dtd(root: Path, rng: np.random.Generator) -> Expected:
    classes = ("banded", "blotchy", "braided")
    lists: dict[str, list[str]] = {"train1": [], "val1": [], "test1": [], "train2": []}
    expected: dict[str, set] = {"train": set(), "test": set()}
    for c, split, n in splits_of(classes):
        path = f"{classes[c]}/{classes[c]}_{split}_{n:04d}.jpg"
        picture(root / "images" / path, c, rng)
        lists["test1" if split == "test" else "val1" if n == 0 else "train1"].append(path)
        lists["train2"].append(path)  # another split's list, not read
        expected[split].add((f"images/{path}", classes[c]))
    write(root, {f"labels/{name}.txt": "\n".join(lines) + "\n" for name, lines in lists.items()})
    return classes, expected["train"], expected["test"]


def pets(root: Path, rng: np.random.Generator) -> Expected:
    classes = ("Abyssinian", "american_bulldog", "beagle")
    lists: dict[str, list[str]] = {"trainval": ["#Image CLASS-ID SPECIES BREED ID"], "test": []}
    expected: dict[str, set] = {"train": set(), "test": set()}
    for c, split, n in splits_of(classes):
        stem = f"{classes[c]}_{n + (50 if split == 'test' else 1)}"
        picture(root / "images" / f"{stem}.jpg", c, rng)
        lists["test" if split == "test" else "trainval"].append(f"{stem} {c + 1} {1 + (c > 0)} {c + 1}")
        expected[split].add((f"images/{stem}.jpg", classes[c]))
    write(root, {f"annotations/{name}.txt": "\n".join(lines) + "\n" for name, lines in lists.items()})
    return classes, expected["train"], expected["test"]


def aircraft(root: Path, rng: np.random.Generator) -> Expected:
    classes = ("707-320", "A300B4", "Cessna 172")
    lists: dict[str, list[str]] = {"trainval": [], "test": []}
    expected: dict[str, set] = {"train": set(), "test": set()}
    for image, (c, split, n) in enumerate(splits_of(classes)):
        picture(root / "data" / "images" / f"{1000 + image:07d}.jpg", c, rng)
        lists["test" if split == "test" else "trainval"].append(f"{1000 + image:07d} {classes[c]}")
        expected[split].add((f"data/images/{1000 + image:07d}.jpg", classes[c]))
    write(root, {"data/variants.txt": "\n".join(classes) + "\n",
                 **{f"data/images_variant_{s}.txt": "\n".join(lines) + "\n" for s, lines in lists.items()}})
    return classes, expected["train"], expected["test"]


def cub(root: Path, rng: np.random.Generator) -> Expected:
    classes = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
    tables: dict[str, list[str]] = {"images": [], "image_class_labels": [], "train_test_split": []}
    expected: dict[str, set] = {"train": set(), "test": set()}
    for image, (c, split, n) in enumerate(splits_of(classes), start=1):
        path = f"{classes[c]}/{classes[c][4:]}_{split}_{n:04d}.jpg"
        picture(root / "images" / path, c, rng)
        tables["images"].append(f"{image} {path}")
        tables["image_class_labels"].append(f"{image} {c + 1}")
        tables["train_test_split"].append(f"{image} {int(split == 'train')}")
        expected[split].add((f"images/{path}", classes[c]))
    write(root, {"classes.txt": "".join(f"{c + 1} {name}\n" for c, name in enumerate(classes)),
                 **{f"{name}.txt": "\n".join(lines) + "\n" for name, lines in tables.items()}})
    return classes, expected["train"], expected["test"]


def flowers(root: Path, rng: np.random.Generator) -> Expected:
    classes = ("001", "002", "003")
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    expected: dict[str, set] = {"train": set(), "test": set()}
    for image, (c, split, n) in enumerate(splits_of(classes), start=1):
        picture(root / "jpg" / f"image_{image:05d}.jpg", c, rng)
        labels.append(c + 1)
        ids["tstid" if split == "test" else "valid" if n == 0 else "trnid"].append(image)
        expected[split].add((f"jpg/image_{image:05d}.jpg", classes[c]))
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(root / "setid.mat", {name: np.array([numbers], dtype=np.uint16) for name, numbers in ids.items()})
    return classes, expected["train"], expected["test"]


def sun397(root: Path, rng: np.random.Generator) -> Expected:
    classes = ("/a/abbey", "/b/beach", "/c/canyon")
    lists: dict[str, list[str]] = {"Training_01": [], "Testing_01": []}
    expected: dict[str, set] = {"train": set(), "test": set()}
    for c, split, n in splits_of(classes):
        path = f"{classes[c]}/sun_{split}{n}.jpg"
        picture(root / path.lstrip("/"), c, rng)
        lists["Testing_01" if split == "test" else "Training_01"].append(path)
        expected[split].add((path.lstrip("/"), classes[c]))
    write(root, {"Partitions/ClassName.txt": "\n".join(classes) + "\n",
                 **{f"Partitions/{name}.txt": "\n".join(lines) + "\n" for name, lines in lists.items()}})
    return classes, expected["train"], expected["test"]


def places205(root: Path, rng: np.random.Generator) -> Expected:
    """Places205's split lists (space-separated path and class number) and its images under
    data/vision/torralba/deeplearning/images256/, a class two folders deep."""
    classes = ("abbey", "apartment_building/outdoor", "bakery/shop")
    lists: dict[str, list[str]] = {"train": [], "val": []}
    expected: dict[str, set] = {"train": set(), "test": set()}
    for c, split, n in splits_of(classes):
        path = f"{classes[c][0]}/{classes[c]}/gsun_{split}{n}.jpg"
        picture(root / "data/vision/torralba/deeplearning/images256" / path, c, rng)
        lists["val" if split == "test" else "train"].append(f"{path} {c}")
        expected[split].add((f"data/vision/torralba/deeplearning/images256/{path}", classes[c]))
    write(root, {f"trainvalsplit_places205/{name}_places205.csv": "\n".join(lines[::-1]) + "\n"
                 for name, lines in lists.items()})
    return classes, expected["train"], expected["test"]


def cars(root: Path, rng: np.random.Generator) -> Expected:
    """The devkit's MATLAB files (struct arrays of annotations, a cell array of names), the test
    labels released apart at the root."""
    classes = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi S4 Sedan 2007")
    rows: dict[str, list[tuple]] = {"train": [], "test": []}
    expected: dict[str, set] = {"train": set(), "test": set()}
    for image, (c, split, n) in enumerate(splits_of(classes), start=1):
        picture(root / f"cars_{split}" / f"{image:05d}.jpg", c, rng)
        rows[split].append((1, 1, 30, 20, c + 1, f"{image:05d}.jpg"))
        expected[split].add((f"cars_{split}/{image:05d}.jpg", classes[c]))
    fields = [(name, "O") for name in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    (root / "devkit").mkdir()
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array([classes], dtype=object)})
    for path, split in (("devkit/cars_train_annos.mat", "train"), ("cars_test_annos_withlabels.mat", "test")):
        savemat(root / path, {"annotations": np.array(rows[split], dtype=fields).reshape(1, -1)})
    unlabelled = [(name, "O") for name, _ in fields if name != "class"]  # the devkit's own test list
    savemat(root / "devkit" / "cars_test_annos.mat",
            {"annotations": np.array([r[:4] + r[5:] for r in rows["test"]], dtype=unlabelled).reshape(1, -1)})
    return classes, expected["train"], expected["test"]


def inaturalist(year: int) -> Callable[[Path, np.random.Generator], Expected]:
    """An iNaturalist release: COCO-style JSON lists naming images under the root, the category ids
    not in order of the names; 2018's lists name them by obfuscated names, the real ones in
    categories.json (as released), 2017's and 2021's in the lists; an image without an annotation
    is left out."""
    def writer(root: Path, rng: np.random.Generator) -> Expected:
        ids, classes = (7, 2, 5), ("Aves_Larus", "Plantae_Acer", "Fungi_Amanita")  # by id: 2, 5, 7
        order = sorted(range(3), key=lambda c: ids[c])
        folder = "train_val" if year < 2021 else "images"
        listed = {i: f"{i:x}3b9e1f" if year == 2018 else classes[c] for c, i in enumerate(ids)}
        tables: dict[str, dict] = {split: {"images": [], "annotations": [], "categories": [
            {"id": i, "name": name} for i, name in listed.items()]} for split in ("train", "val")}
        expected: dict[str, set] = {"train": set(), "test": set()}
        for image, (c, split, n) in enumerate(splits_of(classes)):
            path = f"{folder}{year}/{ids[c]}/{image:04d}.jpg"
            picture(root / path, c, rng)
            table = tables["val" if split == "test" else "train"]
            table["images"].append({"id": 100 + image, "file_name": path, "width": 44, "height": 36})
            table["annotations"].append({"id": image, "image_id": 100 + image, "category_id": ids[c]})
            expected[split].add((path, classes[c]))
        tables["train"]["images"].append({"id": 999, "file_name": f"{folder}{year}/unlabelled.jpg"})
        names = {"train": "train.json", "val": "val.json"} if year == 2021 else {
            split: f"{split}{year}.json" for split in tables}
        write(root, {names[split]: json.dumps(table) for split, table in tables.items()})
        if year == 2018:
            write(root, {"categories.json": json.dumps([{"id": i, "name": classes[c]} for c, i in enumerate(ids)])})
        return tuple(classes[c] for c in order), expected["train"], expected["test"]

    return writer


WRITERS: dict[str, Callable[[Path, np.random.Generator], Expected]] = {
    "Food-101": food101, "DTD": dtd, "Oxford-IIIT Pets": pets, "FGVC-Aircraft": aircraft,
    "CUB-200-2011": cub, "Flowers-102": flowers, "SUN397": sun397, "Places205": places205, "Stanford Cars": cars,
    **{f"iNaturalist {year}": inaturalist(year) for year in (2017, 2018, 2021)}}


@pytest.mark.parametrize("name", WRITERS)
def test_each_release_reads_as_its_lists_say(tmp_path: Path, name: str) -> None:
    """Each image in the split its lists put it, of the class they give, the classes in the
    release's order; found by its marker file, and no other release's."""
    classes, train, test = WRITERS[name](tmp_path, np.random.default_rng(0))
    storage = Storage()
    assert release_at(str(tmp_path), storage) == name
    got_classes, *splits = read_release(name, str(tmp_path), storage)
    assert got_classes == classes
    for (keys, labels), want in zip(splits, (train, test)):
        assert {(Path(k).relative_to(tmp_path).as_posix(), classes[label]) for k, label in zip(keys, labels)} == want
        assert all(Path(k).is_file() for k in keys)


def test_sun397_reads_its_lists_beside_the_images_as_partitions_zip_extracts(tmp_path: Path) -> None:
    """The image archive holds ``ClassName.txt`` at its root and ``Partitions.zip`` extracts its
    lists without a folder: read there as in ``Partitions/``, the same images and classes; the
    root's class list serves lists in ``Partitions/`` that come without one."""
    storage = Storage()
    want = sun397(tmp_path, np.random.default_rng(0))
    partitions = tmp_path / "Partitions"
    shutil.copyfile(partitions / "ClassName.txt", tmp_path / "ClassName.txt")
    (partitions / "ClassName.txt").unlink()
    assert release_at(str(tmp_path), storage) == "SUN397"
    layouts = [read_release("SUN397", str(tmp_path), storage)]
    for name in ("Training_01.txt", "Testing_01.txt"):
        (partitions / name).rename(tmp_path / name)
    partitions.rmdir()
    assert release_at(str(tmp_path), storage) == "SUN397"
    layouts.append(read_release("SUN397", str(tmp_path), storage))
    for classes, *splits in layouts:
        assert classes == want[0]
        for (keys, labels), expected in zip(splits, want[1:]):
            assert {(Path(k).relative_to(tmp_path).as_posix(), classes[y]) for k, y in zip(keys, labels)} == expected
    (tmp_path / "Testing_01.txt").write_text("/a/abbey/sun_test0.jpg\n/d/desert/sun_x.jpg\n")
    with pytest.raises(ValueError, match=r"classes \['/d/desert'\] that ClassName.txt lacks"):
        read_release("SUN397", str(tmp_path), storage)


def test_inaturalist_2021_reads_train_mini_where_the_full_train_list_is_absent(tmp_path: Path) -> None:
    """2021's ``train_mini.json`` (the 50-a-class subset) is the train split when ``train.json``
    is absent; where both are, the full list."""
    storage = Storage()
    classes, train, test = inaturalist(2021)(tmp_path, np.random.default_rng(0))
    full = json.loads((tmp_path / "train.json").read_text())
    mini = {**full, "images": full["images"][:2], "annotations": full["annotations"][:2]}
    (tmp_path / "train_mini.json").write_text(json.dumps(mini))
    assert len(read_release("iNaturalist 2021", str(tmp_path), storage)[1][0]) == len(train)
    (tmp_path / "train.json").unlink()
    assert release_at(str(tmp_path), storage) == "iNaturalist 2021"
    got_classes, (keys, labels), (test_keys, _) = read_release("iNaturalist 2021", str(tmp_path), storage)
    assert got_classes == classes and len(test_keys) == len(test)
    assert [Path(k).relative_to(tmp_path).as_posix() for k in keys] == [i["file_name"] for i in mini["images"]]
    assert {(Path(k).relative_to(tmp_path).as_posix(), classes[y]) for k, y in zip(keys, labels)} <= train


def test_caltech101_draws_30_a_class_by_seed_keeping_the_background_as_a_class(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the transfer protocol (Kornblith et al. 2019) counts BACKGROUND_Google: 102 classes, 30 of each to train
    monkeypatch.setattr(released_sets, "CALTECH_TRAIN_PER_CLASS", 3)
    rng = np.random.default_rng(0)
    for c, name in enumerate(("BACKGROUND_Google", "Faces", "accordion", "airplanes")):
        for n in range(5):
            picture(tmp_path / "101_ObjectCategories" / name / f"image_{n + 1:04d}.jpg", c, rng)
    storage = Storage()
    assert release_at(str(tmp_path), storage) == "Caltech-101"
    classes, (train, train_y), (test, test_y) = read_release("Caltech-101", str(tmp_path), storage, seed=0)
    assert classes == ("BACKGROUND_Google", "Faces", "accordion", "airplanes")
    assert np.bincount(train_y).tolist() == [3, 3, 3, 3] and np.bincount(test_y).tolist() == [2, 2, 2, 2]
    assert sorted(train + test) == sorted(str(p) for p in tmp_path.rglob("*.jpg"))
    assert all(Path(uri).parent.name == classes[y] for uri, y in zip(train + test, train_y + test_y))
    again = read_release("Caltech-101", str(tmp_path), storage, seed=0)[1][0]
    other = read_release("Caltech-101", str(tmp_path), storage, seed=1)[1][0]
    assert again == train and other != train


def test_incomplete_releases_are_refused_naming_the_file(tmp_path: Path) -> None:
    food101(tmp_path / "food", np.random.default_rng(0))
    (tmp_path / "food" / "meta" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta/test.txt is missing"):
        read_release("Food-101", str(tmp_path / "food"), Storage())
    sun397(tmp_path / "sun", np.random.default_rng(0))
    (tmp_path / "sun" / "Partitions" / "ClassName.txt").write_text("/a/abbey\n/b/beach\n")
    with pytest.raises(ValueError, match=r"classes \['/c/canyon'\] that Partitions/ClassName.txt lacks"):
        read_release("SUN397", str(tmp_path / "sun"), Storage())
    cars(tmp_path / "cars", np.random.default_rng(0))
    (tmp_path / "cars" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"devkit/cars_test_annos_withlabels.mat is missing"):
        read_release("Stanford Cars", str(tmp_path / "cars"), Storage())
    shutil.copyfile(tmp_path / "cars" / "devkit" / "cars_test_annos.mat",
                    tmp_path / "cars" / "devkit" / "cars_test_annos_withlabels.mat")
    with pytest.raises(ValueError, match=r"holds no classes: the test labels are released apart"):
        read_release("Stanford Cars", str(tmp_path / "cars"), Storage())
    assert release_at(str(tmp_path), Storage()) is None and set(RELEASES) == {*WRITERS, "Caltech-101"}
    mmpretrain = tmp_path / "imagenet"  # MMPretrain's ImageNet root (meta/, train/ folders): neither Food-101 nor CIFAR
    write(mmpretrain, {"meta/train.txt": "n01440764/a.JPEG 0\n", "meta/val.txt": "b.JPEG 0\n"})
    picture(mmpretrain / "train" / "n01440764" / "a.JPEG", 0, np.random.default_rng(0))
    assert release_at(str(mmpretrain), Storage()) is None


def test_the_suite_scores_a_release_as_the_same_images_in_class_folders(tmp_path: Path) -> None:
    """The independent reference: the images copied into train/<class>/ and val/<class>/ folders
    (listed in the release's order), scored by the suite as class folders: the same figures."""
    classes, train, test = cub(tmp_path / "CUB_200_2011", np.random.default_rng(0))
    for split, images in (("train", train), ("val", test)):
        for path, name in images:
            target = tmp_path / "folders" / split / name / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_path / "CUB_200_2011" / path, target)
    model = backbone()
    report = run_suite(model, SuiteConfig(tasks=("finegrained",), image_size=28,
                                          finegrained_data=f"{tmp_path / 'CUB_200_2011'},{tmp_path / 'folders'}"))
    metrics, section = report["metrics"], report["tasks"]["finegrained"]
    assert section["CUB_200_2011"]["release"] == "CUB-200-2011" and section["folders"]["release"] == "class folders"
    assert section["CUB_200_2011"]["protocol"] == "top1" and metrics["finegrained_mean"] == pytest.approx(
        metrics["finegrained_mean_top1"])
    for kind in ("top1", "class_mean"):
        assert metrics[f"finegrained_CUB_200_2011_{kind}"] == metrics[f"finegrained_folders_{kind}"]
    assert section["CUB_200_2011"]["best_c"] == section["folders"]["best_c"]
    assert section["CUB_200_2011"]["val_accuracies"] == section["folders"]["val_accuracies"]
    assert metrics["finegrained_CUB_200_2011_top1"] > 0.8 and section["CUB_200_2011"]["num_test"] == 3 * TEST
    # a release is any classification's data too (data_kind auto): the k-NN on it is the folders'
    knn = [run_suite(model, SuiteConfig(tasks=("knn",), image_size=28, ks=(1, 3),
                                        data_uri=str(tmp_path / folder)))["metrics"]
           for folder in ("CUB_200_2011", "folders")]
    assert knn[0] == knn[1] and knn[0]["knn_top1_k3"] > 0.8
    with pytest.raises(ValueError, match="holds a released set, whose test split is its own"):
        labelled_images(str(tmp_path / "CUB_200_2011"), "auto", Storage(), test_uri=str(tmp_path / "folders" / "val"))


def write_cifar(root: Path, hundred: bool, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR's python version in miniature: pickled dicts with bytes keys (as its Python 2 pickles
    load), rows of 3072 bytes (red plane, green, blue); returns each split's (N, 32, 32, 3) images and labels."""
    root.mkdir(parents=True)
    names = [b"apple", b"aquarium_fish", b"baby"] if hundred else [b"airplane", b"automobile", b"bird"]
    (root / ("meta" if hundred else "batches.meta")).write_bytes(
        pickle.dumps({b"fine_label_names" if hundred else b"label_names": names}))
    files = {"train": ["train"], "test": ["test"]} if hundred else {
        "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    splits = {}
    for split, names_of_files in files.items():
        images, labels = [], []
        for name in names_of_files:
            label = rng.integers(0, 3, 4)
            planes = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
            batch = {b"data": planes.reshape(4, 3072), b"fine_labels" if hundred else b"labels": label.tolist()}
            (root / name).write_bytes(pickle.dumps(batch))
            images.append(planes.transpose(0, 2, 3, 1))
            labels.append(label)
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return splits


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_batches_read_as_images_and_a_pickle_of_anything_else_is_refused(tmp_path: Path, hundred: bool) -> None:
    """At 32 px (the images' own size) every pixel comes back as the batch holds it, in HWC order."""
    written = write_cifar(tmp_path / "cifar", hundred, np.random.default_rng(0))
    storage = Storage()
    name = "CIFAR-100" if hundred else "CIFAR-10"
    assert release_at(str(tmp_path / "cifar"), storage) == name
    images = release_images(name, str(tmp_path / "cifar"), storage, image_size=28)  # loads at round(28 / 0.875) = 32
    assert images.classes == (("apple", "aquarium_fish", "baby") if hundred else ("airplane", "automobile", "bird"))
    for subset, (pixels, labels) in zip((images.train, images.test), (written["train"], written["test"])):
        assert len(subset) == len(labels) == (4 if hundred else 20 if subset is images.train else 4)
        for row in range(len(subset)):
            sample = subset[row]
            np.testing.assert_array_equal(sample.image.permute(1, 2, 0).numpy(), pixels[row])
            assert sample.label == labels[row]
    (tmp_path / "cifar" / ("test" if hundred else "test_batch")).write_bytes(pickle.dumps({b"data": os.system}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load posix.system: a data set's pickle may hold"):
        release_images(name, str(tmp_path / "cifar"), storage, image_size=28)
