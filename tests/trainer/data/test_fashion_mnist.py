"""Fashion-MNIST IDX parsing: synthetic files of every kind, and the real Debian copy."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from dinoflow.storage import Storage
from trainer.data.fashion_mnist import CLASSES, load_split, parse_idx

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file written by hand from the format's definition (independent of the parser)."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize(
    ("dtype", "code"),
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)],
)
@pytest.mark.parametrize("gzipped", [False, True])
def test_parse_idx_matches_the_written_array(dtype: type, code: int, gzipped: bool) -> None:
    rng = np.random.default_rng(code)
    array = (rng.standard_normal((5, 3, 4)) * 50).astype(dtype)
    data = idx_bytes(array, code)
    parsed = parse_idx(gzip.compress(data) if gzipped else data)
    assert parsed.dtype == np.dtype(dtype) and parsed.shape == (5, 3, 4)
    np.testing.assert_array_equal(parsed, array)


def test_bad_idx_files_are_named() -> None:
    good = idx_bytes(np.zeros((2, 2), np.uint8), 0x08)
    with pytest.raises(ValueError, match="f.idx: IDX shape \\(2, 2\\) needs 4 bytes of data, found 3"):
        parse_idx(good[:-1], "f.idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"\x89PNG....", "f.idx")
    with pytest.raises(ValueError, match="dtype code 0x7 unknown"):
        parse_idx(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="truncated IDX header"):
        parse_idx(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="corrupt gzip"):
        parse_idx(gzip.compress(good)[:-6])


@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split: str, count: int) -> None:
    data = load_split(Storage(), FASHION_MNIST, split)  # type: ignore[arg-type]
    assert data.images.shape == (count, 28, 28) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [count // len(CLASSES)] * len(CLASSES)
    assert 50 < data.images.mean() < 100  # dark background, bright garments
