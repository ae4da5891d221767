"""Write the curated set: webdataset tar shards of the original image bytes, a JSONL manifest.

Images are copied byte for byte (no re-encoding). A key ``<shard URI>#<member>`` whose shard URI
ends in ``.tar`` (as :class:`trainer.data.shards.ShardDataset` names samples) is read out of its
tar; any other key, ``#`` in it or not (a file ``a#1.jpg``), is an object URI.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Sequence
from typing import Any

from dinoflow.progress import progress
from dinoflow.storage import Storage, basename, join_uri
from trainer.data.shards import SHARD_INDEX_SUFFIX, check_index_fits, load_shard_index, write_shard_index


SHARD_MEMBER_MARK = ".tar#"  # a shard (``*.tar``, any case, as list_shards finds them) then its member
WRITTEN_NAME = re.compile(rf"shard-\d{{5,}}\.tar(?:{re.escape(SHARD_INDEX_SUFFIX)})?")  # write_shards' shards, indexes
MANIFEST = "manifest.jsonl"


def shard_member(key: str) -> tuple[str, str] | None:
    """``(shard URI, member)`` of a key naming a tar shard's member, else None (an object's URI).

    Why not any ``#``: an image folder's file may hold one (``a#1.jpg``); only a shard's URI ends in
    ``.tar`` right before it. The first such mark splits, so a member's name may hold ``#`` too."""
    at = key.lower().find(SHARD_MEMBER_MARK)
    if at < 0:
        return None
    return key[: at + len(".tar")], key[at + len(SHARD_MEMBER_MARK):]


def source_uri(key: str) -> str:
    """The object holding the key's image bytes: its shard, or the key itself."""
    named = shard_member(key)
    return key if named is None else named[0]


class ImageBytesReader:
    """Original bytes of a pool image by key: an object, or a tar shard's member read by its byte
    range (the shard's index read, or made, the first time one of its members is asked for).

    Why ranges: the curated keys come in the selection's order, not the shards', so reading whole
    shards would read one per image."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}  # shard -> image member -> (offset, size)

    def read(self, key: str) -> bytes:
        named = shard_member(key)
        if named is None:
            return self.storage.read_bytes(key)
        shard_uri, member = named
        if shard_uri not in self._ranges:
            made, from_file = load_shard_index(self.storage, shard_uri)
            if from_file:
                check_index_fits(self.storage, shard_uri, int(made["shard_size"]))
            self._ranges[shard_uri] = {name: (offset, size) for name, offset, size, _ in made["samples"]}
        offset, size = self._ranges[shard_uri][member]
        return self.storage.read_range(shard_uri, offset, size)


def _extension(key: str) -> str:
    name = basename(key)
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else "jpg"
    return "jpg" if ext == "jpeg" else ext


def write_shards(keys: Sequence[str], records: Sequence[dict[str, Any]], out_uri: str, storage: Storage,
                 shard_size: int = 1000) -> list[str]:
    """Tar shards ``shard-00000.tar`` ... (members ``<000000000>.<ext>`` and ``<...>.json`` with the
    record), each with its index beside it (:func:`~trainer.data.shards.write_shard_index`), and
    ``manifest.jsonl`` (one record a line, with its ``shard`` and ``member``).

    An earlier run's shards and indexes that this one does not overwrite are deleted: training
    reads every ``*.tar`` of the folder, so they would bring back images this curation removed.
    Files of other names are left alone. Order: old manifest deleted, shards written, stale ones
    deleted, manifest written last, so the folder holds a manifest only when it is exactly its set."""
    if len(keys) != len(records):
        raise ValueError(f"{len(keys)} keys but {len(records)} records")
    storage.delete(join_uri(out_uri, MANIFEST))
    reader = ImageBytesReader(storage)
    shard_uris, manifest = [], []
    for start in progress(range(0, len(keys), shard_size), desc="write shards", unit="shard"):
        shard_uri = join_uri(out_uri, f"shard-{start // shard_size:05d}.tar")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, (key, record) in enumerate(zip(keys[start:start + shard_size],
                                                       records[start:start + shard_size])):
                stem = f"{start + offset:09d}"
                member = f"{stem}.{_extension(key)}"
                for name, data in ((member, reader.read(key)), (f"{stem}.json", json.dumps(record).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                manifest.append({**record, "shard": shard_uri, "member": member})
        storage.write_bytes(shard_uri, buffer.getvalue())
        write_shard_index(storage, shard_uri, buffer.getvalue())  # training reads it, not the whole shard, to start
        shard_uris.append(shard_uri)
    _delete_stale(storage, out_uri, shard_uris)
    storage.write_bytes(join_uri(out_uri, MANIFEST), "".join(json.dumps(row) + "\n" for row in manifest).encode())
    return shard_uris


def _delete_stale(storage: Storage, out_uri: str, written: Sequence[str]) -> None:
    """Delete the shards and indexes under ``out_uri`` named as :func:`write_shards` names them but
    not among ``written`` (an earlier, bigger run's), each shard before its index (the listing's
    order): a crash between leaves an index of nothing, which no reader lists."""
    kept = {name for uri in written for name in (basename(uri), basename(uri) + SHARD_INDEX_SUFFIX)}
    for uri in storage.list(out_uri):
        if WRITTEN_NAME.fullmatch(basename(uri)) and basename(uri) not in kept:
            storage.delete(uri)

