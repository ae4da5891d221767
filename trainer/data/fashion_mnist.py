"""Fashion-MNIST read from its IDX files at any storage URI.

Why: it is the data set every machine here has (Debian's ``dataset-fashion-mnist``), small
enough to pretrain on a CPU in minutes and labelled for k-NN and linear-probe evaluation.
The IDX format: two zero bytes, a dtype code, the number of dimensions, then one big-endian
uint32 per dimension, then the values in C order. Files may be gzipped.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dinoflow.storage import Storage, join_uri

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class LabelledImages:
    """Grayscale images ``(N, H, W)`` uint8 with integer labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one IDX file (gzipped or not) into an array, checking its header and length."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{name}: corrupt gzip stream ({err})") from err
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise ValueError(f"{name}: not an IDX file (header {data[:4]!r})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        allowed = ", ".join(hex(c) for c in _IDX_DTYPES)
        raise ValueError(f"{name}: IDX dtype code {dtype_code:#x} unknown (allowed: {allowed})")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise ValueError(f"{name}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[dtype_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_end != expected:
        raise ValueError(
            f"{name}: IDX shape {shape} needs {expected} bytes of data, found {len(data) - header_end}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


def load_split(storage: Storage, root: str, split: Literal["train", "test"]) -> LabelledImages:
    """Read one split from the folder ``root`` holding the four ``*-ubyte.gz`` files."""
    image_file, label_file = FILES[split]
    images = parse_idx(storage.read_bytes(join_uri(root, image_file)), image_file)
    labels = parse_idx(storage.read_bytes(join_uri(root, label_file)), label_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{root}: expected images (N,H,W) and labels (N,), got {images.shape} and {labels.shape}")
    return LabelledImages(images=images, labels=labels.astype(np.int64))


def copy_fashion_mnist(storage: Storage, source: str, destination: str) -> list[str]:
    """Copy the four IDX files into the run's storage; files already there are kept."""
    written = []
    for name in (name for pair in FILES.values() for name in pair):
        target = join_uri(destination, name)
        source_uri = join_uri(source, name)
        if not storage.exists(source_uri):
            raise FileNotFoundError(
                f"Fashion-MNIST file {source_uri} is missing: install Debian's "
                "dataset-fashion-mnist (make demo does) or point the source to a folder holding "
                f"{', '.join(n for pair in FILES.values() for n in pair)}"
            )
        if not (storage.exists(target) and storage.size(target) == storage.size(source_uri)):
            storage.write_bytes(target, storage.read_bytes(source_uri))
        written.append(target)
    return written
