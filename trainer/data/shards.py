"""webdataset tar shards as a map-style data set of decoded samples, read a sample (or a batch's
neighbours) at a time by byte range, through indexes kept beside the shards.

Why its own module: a shard's index (where each image member lies, its label) is what lets a run
on thousands of shards start without reading them and read each sample alone; curation writes the
indexes with its shards, ``dinoflow shards index`` for others, and :class:`ShardDataset` reads them.
Decoding is :mod:`trainer.data.datasets`' (the same for folders and shards).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from dinoflow.progress import progress
from dinoflow.storage import Storage
from trainer.data.datasets import (DEFAULT_MAX_PIXELS, ProcessLocalStorage, Sample, check_max_aspect, check_positive,
                                   decode_region, sample_of)

SHARD_LABEL_EXTENSIONS = ("cls", "txt")  # first one present wins
CAPTION_EXTENSION = "txt"  # not an integer: a caption (img2dataset, LAION), the sample unlabelled
INDEX_READERS = 16  # shards' indexes read at once when a data set starts (thousands on S3: one round trip each)


def _member_kind(member: tarfile.TarInfo) -> str | None:
    """What is wrong with a member's type, or None for a regular file or a folder."""
    if member.issparse():
        return "sparse file"
    if member.isfile() or member.isdir():
        return None
    kinds = {
        tarfile.SYMTYPE: "symbolic link",
        tarfile.LNKTYPE: "hard link",
        tarfile.CHRTYPE: "character device",
        tarfile.BLKTYPE: "block device",
        tarfile.FIFOTYPE: "FIFO",
    }
    return kinds.get(member.type, f"member of tar type {member.type!r}")


def _check_member(shard_uri: str, member: tarfile.TarInfo) -> None:
    if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
        raise ValueError(
            f"shard {shard_uri}: member {member.name!r} has an absolute path or one leaving the "
            "archive; member names must be relative and free of '..'"
        )
    kind = _member_kind(member)
    if kind is not None:
        raise ValueError(
            f"shard {shard_uri}: member {member.name!r} is a {kind}; only regular files (and folders) are allowed"
        )


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset's split: key = folder + basename up to its first dot, extension = the rest."""
    folder, _, basename = name.rpartition("/")
    stem, _, extension = basename.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


@dataclass(frozen=True)
class _IndexedSample:
    name: str  # the image member
    offset: int
    size: int
    label: int


def _index_shard(shard_uri: str, data: bytes, image_extensions: set[str]) -> list[_IndexedSample]:
    """The samples of one webdataset tar, in member order, with their image byte ranges."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as err:
        raise ValueError(f"shard {shard_uri}: not a readable uncompressed tar ({err})") from err
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in members:
        _check_member(shard_uri, member)
        if member.isdir() or _is_hidden(member.name):
            continue
        key, extension = _split_member_name(member.name)
        parts = groups.setdefault(key, {})
        if extension in parts:
            raise ValueError(f"shard {shard_uri}: member {member.name!r} appears twice")
        parts[extension] = member
    samples = []
    for key, parts in groups.items():
        images = sorted(ext for ext in parts if ext in image_extensions)
        if len(images) != 1:
            raise ValueError(
                f"shard {shard_uri}: sample {key!r} has {len(images)} image members ({', '.join(images) or 'none'}); "
                f"exactly one of {', '.join(sorted(image_extensions))} is allowed"
            )
        image = parts[images[0]]
        label = -1
        label_extension = next((ext for ext in SHARD_LABEL_EXTENSIONS if ext in parts), None)
        if label_extension is not None:
            label = _label(shard_uri, parts[label_extension], label_extension, data)
        samples.append(_IndexedSample(image.name, image.offset_data, image.size, label))
    return samples


def _is_hidden(name: str) -> bool:
    """A member in or under a name starting with '.' (macOS's AppleDouble ``._0001.jpg``, ``.DS_Store``):
    metadata, not a sample, skipped as image folders skip hidden files."""
    return any(part.startswith(".") for part in PurePosixPath(name).parts)


def _label(shard_uri: str, member: tarfile.TarInfo, extension: str, data: bytes) -> int:
    """The class index a label member holds; -1 (unlabelled) for a ``.txt`` that holds no integer:
    a caption, as img2dataset's and LAION's shards (``.jpg`` + caption ``.txt`` + ``.json``) have."""
    text = data[member.offset_data : member.offset_data + member.size]
    try:
        return int(text.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError) as err:
        if extension == CAPTION_EXTENSION:
            return -1
        raise ValueError(
            f"shard {shard_uri}: label member {member.name!r} holds {text[:40]!r}, not an integer class index"
        ) from err


SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_INDEX_SUFFIX = ".index.json"  # a shard's index lies beside it: <name>.tar.index.json
MERGE_GAP = 1 << 20  # bytes between two samples of a batch read along rather than asked for apart: less
# than another request's latency costs on object storage (~10 ms at 100 MB/s)


def shard_index_uri(shard_uri: str) -> str:
    """Where the index of the shard at ``shard_uri`` lies (:func:`write_shard_index`)."""
    return shard_uri + SHARD_INDEX_SUFFIX


def list_shards(storage: Storage, folder: str) -> tuple[list[str], set[str]]:
    """The ``*.tar`` shards under ``folder`` (recursively, sorted) and every URI listed there (where
    their indexes are looked for); none is refused, naming the folder."""
    listed = set(storage.list(folder, recursive=True))
    shards = sorted(uri for uri in listed if uri.lower().endswith(".tar"))
    if not shards:
        raise FileNotFoundError(f"no shards under {folder}: allowed are files ending in .tar (any case)")
    return shards, listed


def _extensions(image_extensions: Sequence[str]) -> list[str]:
    """Image members' extensions as an index records them: lower case, no dot, sorted."""
    return sorted({ext.lower().lstrip(".") for ext in image_extensions})


def shard_index(shard_uri: str, data: bytes, image_extensions: Sequence[str] = SHARD_IMAGE_EXTENSIONS) -> bytes:
    """The index of a shard's bytes as JSON: its size, the image extensions it was made for and
    per sample ``[image member, byte offset, size, label]`` (:class:`ShardDataset`)."""
    extensions = _extensions(image_extensions)
    samples = [[s.name, s.offset, s.size, s.label] for s in _index_shard(shard_uri, data, set(extensions))]
    return json.dumps({"shard_size": len(data), "image_extensions": extensions, "samples": samples}).encode()


def write_shard_index(storage: Storage, shard_uri: str, data: bytes | None = None,
                      image_extensions: Sequence[str] = SHARD_IMAGE_EXTENSIONS) -> None:
    """Index a shard (``data``: its bytes, read when not given) and write the index beside it, so a
    :class:`ShardDataset` reads the index instead of the whole shard when it starts."""
    data = storage.read_bytes(shard_uri) if data is None else data
    storage.write_bytes(shard_index_uri(shard_uri), shard_index(shard_uri, data, image_extensions))


def load_shard_index(storage: Storage, shard_uri: str, image_extensions: Sequence[str] = SHARD_IMAGE_EXTENSIONS,
                     listed: set[str] | None = None) -> tuple[dict[str, Any], bool]:
    """A shard's index (:func:`shard_index`, parsed) and whether it came from the file beside the
    shard (``listed``: the URIs of its folder, when known, saves asking whether it exists); made by
    reading the shard when there is none, or one made for other image extensions."""
    extensions = _extensions(image_extensions)
    index_uri = shard_index_uri(shard_uri)
    if (index_uri in listed) if listed is not None else storage.exists(index_uri):
        made = json.loads(storage.read_bytes(index_uri))
        if made.get("image_extensions") == extensions:
            return made, True
    return json.loads(shard_index(shard_uri, storage.read_bytes(shard_uri), extensions)), False


def check_index_fits(storage: Storage, shard_uri: str, indexed_size: int) -> None:
    """Refuse the index of a shard that is not the size it was made for (rewritten since): its byte
    ranges point elsewhere."""
    actual = storage.size(shard_uri)
    if actual != indexed_size:
        raise ValueError(f"{shard_index_uri(shard_uri)} was made for a shard of {indexed_size} bytes but "
                         f"{shard_uri} holds {actual}: the shard changed since; index it again "
                         "(dinoflow shards index <folder>) or delete the index")


class ShardDataset(Dataset[Sample]):
    """Samples of tar shards in webdataset layout, indexed once at construction.

    Members are grouped into samples by key (folder + basename up to the first dot); each
    sample has exactly one image member (jpg, jpeg, png, webp) and optionally a label member
    (``cls``, else ``txt``) holding an integer; a ``txt`` holding anything else is a caption (the
    sample unlabelled, -1); other members are ignored, and hidden ones (a name or folder starting
    with '.', e.g. macOS's ``._0001.jpg``) skipped. ``shards`` is a list of shard URIs, or one folder
    URI whose ``*.tar`` files (recursively, sorted) are the shards. Members with absolute or ``..``
    names, links, devices and sparse files are refused.

    Why an index, and where it comes from: it holds each image's byte range (and label), so a
    sample is read alone and no tar is parsed again. A shard with an index beside it
    (:func:`write_shard_index`: curation writes them, ``dinoflow shards index`` for others) is not
    read at construction, only its index; one without is read whole once to index it (a data set
    of thousands of shards on S3 wants the indexes). An index made for a shard of another size
    (the shard rewritten since) is refused when the shard is first read.

    Why samples are read by their byte ranges, a batch's neighbours in one read: training visits
    the samples in a random order (:class:`~trainer.batches.ResumableBatches`), where reading
    whole shards (~100 MB for some hundreds of samples) would read one per sample; a pass in order
    (curation's embedding, index building) asks for runs of neighbouring samples, which a
    DataLoader hands over as one batch (:meth:`__getitems__`): the samples of a shard lying within
    :data:`MERGE_GAP` of each other come in one ranged read. ``Sample.key`` is
    ``<shard URI>#<image member name>``.
    """

    def __init__(
        self,
        storage: Storage,
        shards: Sequence[str] | str,
        load_size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_extensions: Sequence[str] = SHARD_IMAGE_EXTENSIONS,
        max_aspect: float = 1.0,
    ) -> None:
        check_positive(load_size=load_size, max_pixels=max_pixels)
        check_max_aspect(max_aspect)
        listed: set[str] | None = None
        if isinstance(shards, str):
            shards, listed = list_shards(storage, shards)
        if not shards:
            raise ValueError("shards is an empty list; give shard URIs or a folder URI holding *.tar files")
        self.shards = list(shards)
        self.load_size = load_size
        self.max_pixels = max_pixels
        self.max_aspect = max_aspect
        self._storage = ProcessLocalStorage(storage)
        self._sizes_to_check: dict[int, int] = {}  # shard -> the size its index was made for, until read once
        shard_of, names, offsets, sizes, labels = [], [], [], [], []
        with ThreadPoolExecutor(INDEX_READERS) as pool:  # small reads, each a round trip: several at once
            indexes = pool.map(lambda uri: load_shard_index(storage, uri, image_extensions, listed), self.shards)
            made_all = list(progress(indexes, desc="index shards", total=len(self.shards), unit="shard"))
        for position, (made, from_file) in enumerate(made_all):
            if from_file:
                self._sizes_to_check[position] = int(made["shard_size"])
            for name, offset, size, label in made["samples"]:
                shard_of.append(position)
                names.append(name)
                offsets.append(offset)
                sizes.append(size)
                labels.append(label)
        if not names:
            raise ValueError(f"no samples in the {len(self.shards)} shard(s) starting with {self.shards[0]}")
        # numpy arrays rather than lists of Python objects: forked workers then share the pages
        self._shard_of = np.array(shard_of, dtype=np.int64)
        self._names = np.array(names)
        self._offsets = np.array(offsets, dtype=np.int64)
        self._sizes = np.array(sizes, dtype=np.int64)
        self._labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> Sample:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """The samples at ``indices`` (a DataLoader's batch), each shard's neighbouring ones read
        together (class docstring)."""
        data: dict[int, bytes] = {}
        by_shard: dict[int, list[int]] = {}
        for index in indices:
            by_shard.setdefault(int(self._shard_of[index]), []).append(int(index))
        for shard, members in by_shard.items():
            self._check_size(shard)
            members.sort(key=lambda i: self._offsets[i])
            run = [members[0]]
            for index in [*members[1:], -1]:  # -1: the end, which closes the last run
                if index >= 0 and self._offsets[index] - self._end(run[-1]) <= MERGE_GAP:
                    run.append(index)
                    continue
                first = int(self._offsets[run[0]])
                span = self._storage.get().read_range(self.shards[shard], first, self._end(run[-1]) - first)
                data.update({i: span[self._offsets[i] - first : self._end(i) - first] for i in run})
                run = [index]
        return [sample_of(decode_region(data[i], self.load_size, self.max_pixels, self.max_aspect),
                        int(self._labels[i]), f"{self.shards[int(self._shard_of[i])]}#{self._names[i]}")
                for i in indices]

    def location(self, index: int) -> tuple[str, int, int]:
        """Where sample ``index``'s image lies: its shard's URI, the byte offset and size in it."""
        return self.shards[int(self._shard_of[index])], int(self._offsets[index]), int(self._sizes[index])

    def _end(self, index: int) -> int:
        return int(self._offsets[index] + self._sizes[index])

    def _check_size(self, shard: int) -> None:
        """The first read of a shard indexed from a file: the shard must be the size the index was
        made for, else the byte ranges point elsewhere."""
        expected = self._sizes_to_check.pop(shard, None)
        if expected is not None:
            check_index_fits(self._storage.get(), self.shards[shard], expected)
