"""The fine-grained benchmarks' sets read as released: their own split lists, no conversion to class folders.

Why: each set ships its split in a form of its own (text lists, MATLAB files, no split at all), and
rewriting it as ``train/<class>/`` folders by hand is where a benchmark goes wrong unnoticed
(Flowers-102's test split is its largest, DTD has ten splits, Caltech-101 none). A root laid out as
one of these releases (as its archives extract) is read as it is, by the fine-grained task or as
any classification's data (:func:`evaluators.classification.labelled_images`); any other root is
class folders; Pascal VOC has its own protocol (:mod:`evaluators.multilabel`).

==================  ===================================  ==============================  ===================
set                 root holds                           train                           test
==================  ===================================  ==============================  ===================
Food-101            ``meta/``, ``images/<class>/``       ``meta/train.txt``              ``meta/test.txt``
DTD                 ``labels/``, ``images/<class>/``     ``labels/train1.txt``, val1     ``labels/test1.txt``
Oxford-IIIT Pets    ``annotations/``, ``images/``        ``annotations/trainval.txt``    ``annotations/test.txt``
FGVC-Aircraft       ``data/`` (2013b)                    ``images_variant_trainval.txt`` ``..._test.txt``
CUB-200-2011        ``images.txt`` and its kin           ``train_test_split.txt``: 1     its 0
Flowers-102         ``jpg/``, ``imagelabels.mat``,        ``setid.mat``: trnid, valid     tstid
                    ``setid.mat``
SUN397              ``ClassName.txt``, ``<l>/<class>/``  ``Training_01.txt`` (in         ``Testing_01.txt``
                                                         ``Partitions/`` or the root)
Places205           ``trainvalsplit_places205/``,        ``train_places205.csv``         ``val_places205.csv``
                    ``data/.../images256/``
Caltech-101         ``101_ObjectCategories/<class>/``     30 a class, a seeded draw       the rest
Stanford Cars       ``devkit/``, ``cars_train/``,         ``devkit/cars_train_annos.mat`` ``cars_test_annos_
                    ``cars_test/``                                                        withlabels.mat``
CIFAR-10            ``cifar-10-batches-py``'s files       ``data_batch_1`` to ``_5``      ``test_batch``
CIFAR-100           ``cifar-100-python``'s files          ``train``                       ``test``
iNaturalist         ``train2018.json``, ``val2018.json``  its ``images``, ``annotations`` ``val2018.json``
                    (2017's, 2021's ``train.json`` or
                    ``train_mini.json``; 2018's names
                    in ``categories.json``)
==================  ===================================  ==============================  ===================

Train and val merge where a release has both (the logistic regression holds out its own share to
pick ``C``); DTD and SUN397 are read at their first split, as the transfer benchmarks read them;
Caltech-101 is read as the transfer protocol the paper follows counts it (Kornblith et al. 2019, "Do
Better ImageNet Models Transfer Better?", as in SimCLR and DINOv2's fine-grained evaluation): 102
classes, ``BACKGROUND_Google`` one of them, 3,060 train and 6,084 test images, scored by mean
per-class accuracy; leaving the background out (101 classes) would make figures that do not compare
with the paper's. CIFAR's python batches are pickles: they are read by an unpickler that makes
arrays, lists and numbers only (a pickle could otherwise run any code), their 32 px images resized
as decoded files are (:class:`ImageArray`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import PurePosixPath

import numpy as np
import torch
from PIL import Image
from scipy.io import loadmat
from torch.utils.data import Dataset

from dinoflow.storage import Storage, join_uri
from evaluators.pickles import load_data_pickle
from trainer.data.datasets import IMAGE_EXTENSIONS, ImageListDataset, Sample, resize_center_crop

CALTECH_TRAIN_PER_CLASS = 30
Split = tuple[list[str], list[int]]  # the images' URIs and their classes' indices
Release = tuple[tuple[str, ...], Split, Split]  # classes, train, test


def release_file(storage: Storage, root: str, *path: str) -> bytes:
    """A file of the release at ``root``, or an error naming it (here and in
    :mod:`evaluators.video_sets`, each set's files listed)."""
    uri = join_uri(root, *path)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} is missing: {root} looks like a released set whose files are incomplete "
                                "(evaluators/released_sets.py and video_sets.py list each set's files, as its "
                                "archives extract)")
    return storage.read_bytes(uri)


def release_lines(storage: Storage, root: str, *path: str) -> list[str]:
    """The non-empty lines of a release's list (LF or CRLF; ``#`` comments left out), stripped."""
    text = release_file(storage, root, *path).decode("utf-8-sig")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _by_name(root: str, folder: str, paths: list[str], classes: tuple[str, ...], suffix: str = "") -> Split:
    """The images ``<root>/<folder>/<path><suffix>`` of each of ``paths``, classed by their first folder."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({path.split("/", 1)[0] for path in paths} - set(index))
    if unknown:
        raise ValueError(f"{root}: images of classes {unknown[:5]} that its class list lacks")
    return [join_uri(root, folder, f"{path}{suffix}") for path in paths], [index[path.split("/", 1)[0]]
                                                                          for path in paths]


def _food101(storage: Storage, root: str, seed: int) -> Release:
    classes = tuple(release_lines(storage, root, "meta", "classes.txt"))
    return classes, *(_by_name(root, "images", release_lines(storage, root, "meta", f"{split}.txt"), classes, ".jpg")
                      for split in ("train", "test"))


def _dtd(storage: Storage, root: str, seed: int) -> Release:
    lists = [release_lines(storage, root, "labels", f"{split}1.txt") for split in ("train", "val", "test")]
    train, test = lists[0] + lists[1], lists[2]
    classes = tuple(sorted({path.split("/", 1)[0] for path in train + test}))
    return classes, _by_name(root, "images", train, classes), _by_name(root, "images", test, classes)


def _pets(storage: Storage, root: str, seed: int) -> Release:
    """``annotations/<split>.txt``: ``<image> <class id from 1> <species> <breed id>``, the breed the
    image name less its number."""
    splits = [[line.split() for line in release_lines(storage, root, "annotations", f"{split}.txt")]
              for split in ("trainval", "test")]
    names = {int(row[1]): row[0].rsplit("_", 1)[0] for rows in splits for row in rows}
    position = {number: i for i, number in enumerate(sorted(names))}
    return tuple(names[i] for i in sorted(names)), *(([join_uri(root, "images", f"{row[0]}.jpg") for row in rows],
                                                     [position[int(row[1])] for row in rows]) for rows in splits)


def _aircraft(storage: Storage, root: str, seed: int) -> Release:
    """``data/images_variant_<split>.txt``: ``<image id> <variant>``, the variant's name with spaces."""
    classes = tuple(release_lines(storage, root, "data", "variants.txt"))
    index = {name: i for i, name in enumerate(classes)}
    splits = []
    for split in ("trainval", "test"):
        rows = [line.split(" ", 1) for line in release_lines(storage, root, "data", f"images_variant_{split}.txt")]
        unknown = sorted({variant for _, variant in rows} - set(index))
        if unknown:
            raise ValueError(f"{root}: images of variants {unknown[:5]} that data/variants.txt lacks")
        splits.append(([join_uri(root, "data", "images", f"{image}.jpg") for image, _ in rows],
                       [index[variant] for _, variant in rows]))
    return classes, *splits


def _cub(storage: Storage, root: str, seed: int) -> Release:
    """``images.txt`` (id, path), ``image_class_labels.txt`` (id, class id), ``train_test_split.txt``
    (id, 1 for train), ``classes.txt`` (class id, name), every id from 1."""
    table = {name: dict(line.split(" ", 1) for line in release_lines(storage, root, f"{name}.txt"))
             for name in ("images", "image_class_labels", "train_test_split", "classes")}
    ids = sorted(table["classes"], key=int)
    position = {class_id: i for i, class_id in enumerate(ids)}
    splits: tuple[Split, Split] = (([], []), ([], []))
    for image, path in table["images"].items():
        keys, labels = splits[0] if table["train_test_split"][image] == "1" else splits[1]
        keys.append(join_uri(root, "images", path))
        labels.append(position[table["image_class_labels"][image]])
    classes = tuple(table["classes"][i] for i in ids)
    return classes, *splits


def _flowers(storage: Storage, root: str, seed: int) -> Release:
    """``imagelabels.mat``'s ``labels`` (1 to 102, image ``jpg/image_<n>.jpg`` the n-th) and
    ``setid.mat``'s image numbers: ``trnid`` and ``valid`` train, ``tstid`` test."""
    labels = np.atleast_1d(_matlab(storage, root, "imagelabels.mat")["labels"]).astype(int)
    ids = _matlab(storage, root, "setid.mat")
    classes = tuple(f"{i:03d}" for i in range(1, int(labels.max()) + 1))

    def split(numbers: np.ndarray) -> Split:
        numbers = numbers.ravel().astype(int)
        return ([join_uri(root, "jpg", f"image_{n:05d}.jpg") for n in numbers], (labels[numbers - 1] - 1).tolist())

    return classes, split(np.concatenate([ids["trnid"].ravel(), ids["valid"].ravel()])), split(ids["tstid"])


def _matlab(storage: Storage, root: str, path: str) -> dict:
    """A release's MATLAB file, its arrays squeezed (a struct array's fields by name)."""
    return loadmat(io.BytesIO(release_file(storage, root, path)), squeeze_me=True)


def _cars(storage: Storage, root: str, seed: int) -> Release:
    """``devkit/cars_meta.mat``'s ``class_names``; ``devkit/cars_train_annos.mat`` and
    ``cars_test_annos_withlabels.mat`` (released apart: at the root or in ``devkit/``), each image's
    ``fname`` (under ``cars_train/``, ``cars_test/``) and ``class`` (from 1)."""
    classes = tuple(str(name) for name in np.atleast_1d(_matlab(storage, root, "devkit/cars_meta.mat")["class_names"]))
    test = "cars_test_annos_withlabels.mat"
    splits = []
    for folder, listing in (("cars_train", "devkit/cars_train_annos.mat"),
                            ("cars_test", test if storage.exists(join_uri(root, test)) else f"devkit/{test}")):
        table = np.atleast_1d(_matlab(storage, root, listing)["annotations"])
        if "class" not in (table.dtype.names or ()):
            raise ValueError(f"{join_uri(root, listing)} holds no classes: the test labels are released apart, "
                             f"as {test}")
        splits.append(([join_uri(root, folder, str(name)) for name in table["fname"]],
                       (table["class"].astype(int) - 1).tolist()))
    return classes, *splits


def _sun397(storage: Storage, root: str, seed: int) -> Release:
    """The first split's lists of image paths under the root (``/a/abbey/sun_<id>.jpg``, the class an
    image's folder) and the class list (``/a/abbey``): ``Partitions.zip``'s files in ``Partitions/``
    or, as the zip extracts, beside the image folders; the class list there or the image archive's
    own ``ClassName.txt`` at the root."""
    lists = ("Partitions",) if storage.exists(join_uri(root, "Partitions", "Training_01.txt")) else ()
    names = lists if storage.exists(join_uri(root, *lists, "ClassName.txt")) else ()
    classes = tuple(release_lines(storage, root, *names, "ClassName.txt"))
    index = {name: i for i, name in enumerate(classes)}
    splits = []
    for split in ("Training_01", "Testing_01"):
        paths = release_lines(storage, root, *lists, f"{split}.txt")
        unknown = sorted({str(PurePosixPath(p).parent) for p in paths} - set(index))
        if unknown:
            raise ValueError(f"{root}: images of classes {unknown[:5]} that {'/'.join((*names, 'ClassName.txt'))} "
                             "lacks")
        splits.append(([join_uri(root, p.lstrip("/")) for p in paths], [index[str(PurePosixPath(p).parent)]
                                                                         for p in paths]))
    return classes, *splits


PLACES_IMAGES = ("data", "vision", "torralba", "deeplearning", "images256")  # where Places205's archive puts them


def _places205(storage: Storage, root: str, seed: int) -> Release:
    """``trainvalsplit_places205/{train,val}_places205.csv`` (space-separated ``a/abbey/gsun_<id>.jpg
    0``: the image under :data:`PLACES_IMAGES`, its class numbered from 0), a class named by its
    images' folders below the letter (``abbey``, ``apartment_building/outdoor``)."""
    names: dict[int, str] = {}
    splits = []
    for split in ("train", "val"):
        keys, labels = [], []
        for line in release_lines(storage, root, "trainvalsplit_places205", f"{split}_places205.csv"):
            path, label = line.rsplit(maxsplit=1)
            keys.append(join_uri(root, *PLACES_IMAGES, path))
            labels.append(int(label))
            names.setdefault(int(label), "/".join(PurePosixPath(path).parts[1:-1]))
        splits.append((keys, labels))
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{join_uri(root, 'trainvalsplit_places205')}: class numbers must run 0 to {len(names) - 1}, "
                         f"got {sorted(names)[:5]}...")
    return tuple(names[i] for i in range(len(names))), *splits


def _caltech101(storage: Storage, root: str, seed: int) -> Release:
    """Every class folder of ``101_ObjectCategories``, ``BACKGROUND_Google`` included as the transfer
    protocol counts it (102 classes, see the module's docstring): a seeded draw of
    :data:`CALTECH_TRAIN_PER_CLASS` images of each to train, the rest to test."""
    folder = join_uri(root, "101_ObjectCategories")
    prefix = folder.rstrip("/") + "/"
    found: dict[str, list[str]] = {}
    for uri in storage.list(folder, recursive=True):
        parts = uri[len(prefix):].split("/")
        if len(parts) == 2 and uri.lower().endswith(tuple(IMAGE_EXTENSIONS)):
            found.setdefault(parts[0], []).append(uri)
    classes = tuple(sorted(found))
    rng = np.random.default_rng(seed)
    train: Split = ([], [])
    test: Split = ([], [])
    for label, name in enumerate(classes):
        images = sorted(found[name])
        drawn = set(rng.permutation(len(images))[:CALTECH_TRAIN_PER_CLASS].tolist())
        for row, uri in enumerate(images):
            split = train if row in drawn else test
            split[0].append(uri)
            split[1].append(label)
    return classes, train, test


def _inaturalist(train: tuple[str, ...], val: str) -> Callable[[Storage, str, int], Release]:
    """The reader of an iNaturalist release whose train list is the first of ``train`` the root holds
    (2021's full ``train.json``, else its ``train_mini.json``) and whose val list is ``val``:
    COCO-style JSON (``images``' ``id`` and ``file_name`` under the root, ``annotations``'
    ``image_id`` and ``category_id``, ``categories``' ``id`` and ``name``); val is the test split
    (the test labels are withheld), classes ordered by id. 2018's lists name their categories by
    obfuscated names, the real ones released later as ``categories.json``: where the root holds it,
    its names replace the lists'."""

    def read(storage: Storage, root: str, seed: int) -> Release:
        found = next((name for name in train if storage.exists(join_uri(root, name))), train[0])
        tables = [json.loads(release_file(storage, root, name)) for name in (found, val)]
        given = storage.exists(join_uri(root, "categories.json"))
        listed = json.loads(release_file(storage, root, "categories.json")) if given else []
        categories = [*(c for table in tables for c in table.get("categories", [])), *listed]
        names = {c["id"]: str(c["name"]) for c in categories if "name" in c}
        ids = sorted({*(c["id"] for c in categories), *(a["category_id"] for t in tables for a in t["annotations"])})
        index = {category: i for i, category in enumerate(ids)}
        splits = []
        for table in tables:
            labels = {a["image_id"]: a["category_id"] for a in table["annotations"]}
            images = [image for image in table["images"] if image["id"] in labels]
            splits.append(([join_uri(root, image["file_name"]) for image in images],
                           [index[labels[image["id"]]] for image in images]))
        return tuple(names.get(category, str(category)) for category in ids), *splits

    return read


# a file a release holds (relative to its root), or files of which it holds one at least
Marker = str | tuple[str, ...]
# each release: the files that together only it holds, and its reader
RELEASES: dict[str, tuple[tuple[Marker, ...], Callable[[Storage, str, int], Release]]] = {
    "Food-101": (("meta/train.txt", "meta/classes.txt"), _food101), "DTD": (("labels/train1.txt",), _dtd),
    "Oxford-IIIT Pets": (("annotations/trainval.txt",), _pets), "FGVC-Aircraft": (("data/variants.txt",), _aircraft),
    "CUB-200-2011": (("train_test_split.txt",), _cub), "Flowers-102": (("setid.mat",), _flowers),
    "SUN397": ((("Partitions/ClassName.txt", "ClassName.txt"),), _sun397),
    "Places205": (("trainvalsplit_places205/train_places205.csv",), _places205),
    "Caltech-101": (("101_ObjectCategories",), _caltech101), "Stanford Cars": (("devkit/cars_meta.mat",), _cars),
    "iNaturalist 2017": (("train2017.json",), _inaturalist(("train2017.json",), "val2017.json")),
    "iNaturalist 2018": (("train2018.json",), _inaturalist(("train2018.json",), "val2018.json")),
    "iNaturalist 2021": (("val.json",), _inaturalist(("train.json", "train_mini.json"), "val.json"))}


def _batch(storage: Storage, root: str, name: str) -> dict:
    """One of CIFAR's pickled batches (python version), by :func:`~evaluators.pickles.load_data_pickle`."""
    return load_data_pickle(release_file(storage, root, name), encoding="bytes")


def _cifar(storage: Storage, root: str, hundred: bool) -> tuple[tuple[str, ...], list[tuple[np.ndarray, np.ndarray]]]:
    """CIFAR's classes and its train and test images ``(N, 32, 32, 3)`` uint8 with their labels
    (CIFAR-100's fine labels)."""
    meta, key = ("meta", b"fine_label_names") if hundred else ("batches.meta", b"label_names")
    names = _batch(storage, root, meta)[key]
    parts = (["train"], ["test"]) if hundred else ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
    splits = []
    for files in parts:
        batches = [_batch(storage, root, name) for name in files]
        images = [np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for b in batches]
        labels = [np.asarray(b[b"fine_labels" if hundred else b"labels"], dtype=np.int64) for b in batches]
        splits.append((np.concatenate(images), np.concatenate(labels)))
    return tuple(name.decode() for name in names), splits


class ImageArray(Dataset[Sample]):
    """Images held as ``(N, H, W, 3)`` uint8 (CIFAR's), each resized as a decoded file is (the
    shorter side to ``load_size``, the centre square kept); ``Sample.key`` ``<uri>#<index>``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, load_size: int, uri: str) -> None:
        self.images, self.labels, self.load_size, self.uri = images, labels, load_size, uri

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        square = resize_center_crop(Image.fromarray(self.images[index]), self.load_size)
        pixels = torch.from_numpy(np.array(square, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return Sample(pixels, int(self.labels[index]), f"{self.uri}#{index}")


# CIFAR's python versions: the files that together only each holds (as RELEASES'), and whether it is CIFAR-100
CIFARS = {"CIFAR-10": (("batches.meta",), False), "CIFAR-100": (("meta", "train"), True)}


def holds_markers(storage: Storage, root: str, markers: tuple[Marker, ...]) -> bool:
    """Whether ``root`` holds every one of ``markers`` (of a tuple of files, any one)."""
    return all(any(storage.exists(join_uri(root, file)) for file in ((marker,) if isinstance(marker, str) else marker))
               for marker in markers)


def release_at(root: str, storage: Storage) -> str | None:
    """The release of :data:`RELEASES` or :data:`CIFARS` laid out at ``root``, or None (class folders, say).
    CIFAR's markers must be files (an ImageNet root may hold ``meta/`` and ``train/`` folders)."""
    for name, (markers, _) in RELEASES.items():
        if holds_markers(storage, root, markers):
            return name
    for name, (files, _) in CIFARS.items():
        uris = [join_uri(root, file) for file in files]
        if all(storage.exists(uri) and not storage.list(uri, recursive=True) for uri in uris):
            return name
    return None


def read_release(name: str, root: str, storage: Storage, seed: int = 0) -> Release:
    """``(classes, (train URIs, labels), (test URIs, labels))`` of release ``name`` at ``root``
    (``seed``: Caltech-101's draw), each split non-empty."""
    classes, train, test = RELEASES[name][1](storage, root, seed)
    if not train[0] or not test[0]:
        raise ValueError(f"{root} ({name}) lists {len(train[0])} train and {len(test[0])} test images: both "
                         "splits need images")
    return classes, train, test


def release_datasets(name: str, root: str, storage: Storage, load_size: int,
                     seed: int = 0) -> tuple[tuple[str, ...], Dataset[Sample], Dataset[Sample]]:
    """Release ``name`` at ``root`` as its classes and its train and test images, each decoded (or,
    CIFAR's, resized) with the shorter side at ``load_size``, labelled by class index."""
    if name in CIFARS:
        classes, arrays = _cifar(storage, root, CIFARS[name][1])
        train, test = (ImageArray(images, labels, load_size, join_uri(root, split))
                       for (images, labels), split in zip(arrays, ("train", "test")))
        return classes, train, test
    classes, *lists = read_release(name, root, storage, seed)
    train, test = (ImageListDataset(storage, keys, labels, load_size) for keys, labels in lists)
    return classes, train, test
