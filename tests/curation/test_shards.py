"""Curated shards copy the pool's bytes: from tar shards, each member read by its byte range."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from curation.shards import shard_member, source_uri, write_shards
from tests.trainer.data.test_shards import CountedStorage, indexed_shards
from trainer.data.shards import SHARD_INDEX_SUFFIX, shard_index_uri


def test_curated_shards_copy_pool_members_by_their_byte_ranges(tmp_path: Path) -> None:
    """Keys in the selection's order, alternating between the pool's shards: each pool shard's index
    is read once and each image by its range (never a whole pool shard per image), the bytes copied
    unchanged; a pool shard rewritten since its index is refused."""
    storage = CountedStorage()
    pool, _ = indexed_shards(storage, str(tmp_path / "pool"), count=2, per_shard=4)
    keys = [f"{pool[i % 2]}#{i // 2:04d}.png" for i in range(8)]
    storage.reads.clear()
    written = write_shards(keys, [{"id": key} for key in keys], str(tmp_path / "out"), storage, shard_size=5)
    reads = [read for read in storage.reads if not read[1].startswith(str(tmp_path / "out"))]
    assert sorted(set(reads)) == sorted({("whole", shard_index_uri(uri)) for uri in pool} |
                                        {("range", uri) for uri in pool})
    assert len(reads) == 2 + 8
    for key, member_of in zip(keys, [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2)]):
        shard, member = key.split("#")
        with tarfile.open(shard) as tar:
            original = tar.extractfile(member).read()  # type: ignore[union-attr]
        out, position = member_of
        with tarfile.open(written[out]) as tar:
            copied = tar.extractfile(f"{5 * out + position:09d}.png").read()  # type: ignore[union-attr]
        assert copied == original
    assert len(json.loads(Path(shard_index_uri(written[0])).read_text())["samples"]) == 5
    Path(pool[0]).write_bytes(Path(pool[0]).read_bytes() + b"\0" * 512)
    with pytest.raises(ValueError, match="the shard changed since; index it again"):
        write_shards(keys, [{"id": key} for key in keys], str(tmp_path / "again"), storage)


def test_only_a_tar_shards_uri_before_the_hash_names_a_member() -> None:
    assert shard_member("s3://b/pool/shard-0.tar#0001.png") == ("s3://b/pool/shard-0.tar", "0001.png")
    assert shard_member("/pool/run#2/SHARD.TAR#a#1.jpg") == ("/pool/run#2/SHARD.TAR", "a#1.jpg")
    assert shard_member("/pool/a#1.jpg") is None and shard_member("/pool/x.tar") is None
    assert source_uri("/pool/a#1.jpg") == "/pool/a#1.jpg" and source_uri("/p/s.tar#1.png") == "/p/s.tar"


def test_curated_shards_copy_an_image_whose_name_holds_a_hash(tmp_path: Path) -> None:
    storage = CountedStorage()
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a#1.jpg").write_bytes(b"jpeg bytes")
    key = str(tmp_path / "pool" / "a#1.jpg")
    (written,) = write_shards([key], [{"id": key}], str(tmp_path / "out"), storage)
    with tarfile.open(written) as tar:
        assert tar.extractfile("000000000.jpg").read() == b"jpeg bytes"  # type: ignore[union-attr]


def test_an_image_key_with_a_trailing_slash_keeps_its_extension(tmp_path: Path) -> None:
    """Storage reads ``b.PNG/`` as ``b.PNG``: its member is a ``.png`` (it was a ``.jpg``, the
    extension of a name without one)."""
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "b.PNG").write_bytes(b"png bytes")
    key = str(tmp_path / "pool" / "b.PNG") + "/"
    (written,) = write_shards([key], [{"id": key}], str(tmp_path / "out"), CountedStorage())
    with tarfile.open(written) as tar:
        assert tar.extractfile("000000000.png").read() == b"png bytes"  # type: ignore[union-attr]


def test_a_smaller_rewrite_leaves_none_of_the_earlier_runs_shards(tmp_path: Path) -> None:
    """Rewritten with fewer images, the folder held the earlier run's higher-numbered shards, which
    training (every ``*.tar``) read: images the new curation removed. Other files stay; a rewrite
    that fails midway leaves no manifest, the mark of a finished set."""
    storage = CountedStorage()
    (tmp_path / "pool").mkdir()
    keys = []
    for index in range(7):
        (tmp_path / "pool" / f"{index}.png").write_bytes(b"png %d" % index)
        keys.append(str(tmp_path / "pool" / f"{index}.png"))
    out = tmp_path / "out"
    write_shards(keys, [{"id": key} for key in keys], str(out), storage, shard_size=2)
    assert len(list(out.glob("shard-*.tar"))) == 4
    for other in ("notes.txt", "shard-7.tar", "shard-00009.tar.bak", "old-shard-00003.tar"):
        (out / other).write_bytes(b"not write_shards'")
    written = write_shards(keys[:3], [{"id": key} for key in keys[:3]], str(out), storage, shard_size=2)
    ours = [f"shard-0000{i}.tar{index}" for i in range(2) for index in ("", SHARD_INDEX_SUFFIX)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*ours, "manifest.jsonl", "notes.txt", "shard-7.tar",
                                                            "shard-00009.tar.bak", "old-shard-00003.tar"])
    assert [Path(uri).name for uri in written] == ["shard-00000.tar", "shard-00001.tar"]
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3
    with pytest.raises(FileNotFoundError):
        write_shards([*keys[:3], str(tmp_path / "pool" / "gone.png")], [{"id": 0}] * 4, str(out), storage, 2)
    assert not (out / "manifest.jsonl").exists()
