"""ImageNet-1k's validation split as released: 50,000 images in one flat folder, their classes in a
list beside them.

Why: ``ILSVRC2012_img_val.tar`` extracts flat (``ILSVRC2012_val_00000001.JPEG`` ...), and sorting it
into ``val/<wnid>/`` folders takes a script from elsewhere (``valprep.sh``) that is easy to get
wrong or forget. The classes are read as released instead, from either list:

* Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the class is the first word of
  the boxes' string, ``n01751748 ...``);
* the devkit's ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` (the n-th
  line the n-th image's ILSVRC2012 ID, 1 to 1000) with ``data/meta.mat``, whose ``synsets`` give
  each ID its WordNet ID. The IDs are not in the sorted-WNID order of the class folders: they are
  mapped through their WNIDs, never used as indices.

Each is looked for in the validation folder and in the folder above it (the root holding
``train/``), the devkit also as its archive extracts there.
"""

from __future__ import annotations

import csv
import io

import numpy as np
from scipy.io import loadmat

from dinoflow.storage import Storage, basename, join_uri

VAL_PREFIX = "ILSVRC2012_val_"
SOLUTION = "LOC_val_solution.csv"
DEVKIT = "ILSVRC2012_devkit_t12"


def flat_val_images(storage: Storage, val_uri: str) -> list[str]:
    """The released validation images lying directly in ``val_uri`` (``ILSVRC2012_val_*.JPEG``), sorted."""
    return sorted(uri for uri in storage.list(val_uri)
                  if basename(uri).startswith(VAL_PREFIX) and uri.lower().endswith(".jpeg"))


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def val_wnids(storage: Storage, val_uri: str) -> dict[str, str]:
    """Each released validation image's stem (``ILSVRC2012_val_00000001``) -> its class's WNID, from
    Kaggle's solution file or the devkit found beside ``val_uri`` or above it."""
    for folder in (val_uri, _parent(val_uri)):
        solution = join_uri(folder, SOLUTION)
        if storage.exists(solution):
            rows = csv.DictReader(io.StringIO(storage.read_bytes(solution).decode("utf-8-sig")))
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
        data = join_uri(folder, DEVKIT, "data")
        if storage.exists(join_uri(data, "ILSVRC2012_validation_ground_truth.txt")):
            synsets = loadmat(io.BytesIO(storage.read_bytes(join_uri(data, "meta.mat"))), squeeze_me=True)["synsets"]
            wnid = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
            ids = storage.read_bytes(join_uri(data, "ILSVRC2012_validation_ground_truth.txt")).decode().split()
            return {f"{VAL_PREFIX}{n:08d}": wnid[int(i)] for n, i in enumerate(ids, 1)}
    raise FileNotFoundError(f"{val_uri} holds ImageNet's validation images as released (flat), but neither "
                            f"{SOLUTION} nor {DEVKIT}/data/ (ILSVRC2012_validation_ground_truth.txt, meta.mat) "
                            f"lies in it or in {_parent(val_uri)}: their classes come from one of them")


def flat_val_labels(storage: Storage, val_uri: str, images: list[str], classes: tuple[str, ...]) -> np.ndarray:
    """The classes' indices in ``classes`` (train's sorted WNID folders) of ``images``, the released
    validation images at ``val_uri`` (:func:`flat_val_images`); an image the list lacks, or of a
    class train lacks, is refused."""
    wnids = val_wnids(storage, val_uri)
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for uri in images:
        stem = basename(uri).rsplit(".", 1)[0]
        if stem not in wnids:
            raise ValueError(f"{uri}: its class is not in the validation list beside it")
        if wnids[stem] not in index:
            raise ValueError(f"{uri} is of class {wnids[stem]}, which train's {len(classes)} class folders lack")
        labels.append(index[wnids[stem]])
    return np.asarray(labels, dtype=np.int64)
