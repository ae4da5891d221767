"""Tar shards (``trainer/data/shards.py``) as fixed-size uint8 samples, on disk and on S3: labels,
indexes beside the shards, reads by byte range, unsafe or broken shards named."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from dinoflow.storage import Storage, join_uri
from tests.trainer.data.test_datasets import S, assert_close, decoded, encode, expected, smooth_rgb
from trainer.data.datasets import collate_samples
from trainer.data.shards import ShardDataset, shard_index_uri, write_shard_index


def tar_bytes(members: list[tuple[str, bytes] | tarfile.TarInfo]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_shards_with_labels(storage_root: tuple[Storage, str]) -> None:
    storage, root = storage_root
    images = {i: smooth_rgb(32 + 16 * i, 32, 20 + i) for i in range(4)}  # integer scales
    first = tar_bytes(
        [
            ("000000.jpg", encode(Image.fromarray(images[0]), "JPEG")),
            ("000000.cls", b"3"),
            ("000001.png", encode(Image.fromarray(images[1]), "PNG")),
            ("000001.txt", b" 7\n"),
            ("000001.json", b"{}"),
            ("sub/000002.WEBP", encode(Image.fromarray(images[2]), "WEBP", lossless=True)),
        ]
    )
    second = tar_bytes(
        [
            ("000000.png", encode(Image.fromarray(images[3]), "PNG")),
            ("000000.cls", b"1"),
            ("000004.jpeg", b"broken"),
            ("000004.cls", b"2"),
        ]
    )
    storage.write_bytes(join_uri(root, "shards/a.tar"), first)
    storage.write_bytes(join_uri(root, "shards/more/b.TAR"), second)
    storage.write_bytes(join_uri(root, "shards/readme.md"), b"not a shard")
    shard_a, shard_b = join_uri(root, "shards/a.tar"), join_uri(root, "shards/more/b.TAR")

    by_folder = ShardDataset(storage, join_uri(root, "shards"), load_size=S)
    by_list = ShardDataset(storage, [shard_a, shard_b], load_size=S)
    assert by_folder.shards == [shard_a, shard_b]
    for dataset in (by_folder, by_list):
        samples = [dataset[i] for i in range(len(dataset))]
        assert [s.key for s in samples] == [
            f"{shard_a}#000000.jpg",
            f"{shard_a}#000001.png",
            f"{shard_a}#sub/000002.WEBP",
            f"{shard_b}#000000.png",
            f"{shard_b}#000004.jpeg",
        ]
        assert [s.label for s in samples] == [3, 7, -1, 1, 2]
        assert_close(samples[0].image, expected(decoded(encode(Image.fromarray(images[0]), "JPEG"))))
        for i in (1, 2):
            assert_close(samples[i].image, expected(images[i]))
        assert_close(samples[3].image, expected(images[3]))
        assert samples[4].image is None
        assert_close(dataset[0].image, samples[0].image.numpy())  # back to the first shard
    wide = ShardDataset(storage, [shard_a, shard_b], load_size=S, max_aspect=2.5)
    assert [wide[i].aspect for i in range(len(wide))] == [1.0, 1.5, 2.0, 2.5, 1.0]  # 32 x 32 ... 80 x 32
    clone = pickle.loads(pickle.dumps(by_list))  # what a spawned worker gets
    assert clone[3].label == 1


def test_caption_shards_load_unlabelled(tmp_path: Path) -> None:
    """img2dataset's layout (LAION): a ``.txt`` caption beside each ``.jpg`` and ``.json`` is not a
    label: the sample is unlabelled (-1), as is one in another encoding than UTF-8; an integer
    ``.txt`` is still a label, and ``.cls`` still wins."""
    jpeg = encode(Image.fromarray(smooth_rgb(32, 32, 3)), "JPEG")
    shard = tmp_path / "laion.tar"
    shard.write_bytes(tar_bytes([
        ("000000000.jpg", jpeg), ("000000000.txt", b"a photo of a dog"), ("000000000.json", b'{"url": "x"}'),
        ("000000001.jpg", jpeg), ("000000001.txt", "légende".encode("latin-1")),
        ("000000002.jpg", jpeg), ("000000002.txt", b" 12\n"),
        ("000000003.jpg", jpeg), ("000000003.txt", b"a cat"), ("000000003.cls", b"4"),
    ]))
    dataset = ShardDataset(Storage(), [str(shard)], load_size=S)
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s.label for s in samples] == [-1, -1, 12, 4] and all(s.image is not None for s in samples)


def test_hidden_members_are_skipped(tmp_path: Path) -> None:
    """macOS's AppleDouble members (``._<name>``), ``.DS_Store`` and hidden folders are metadata, as
    image folders take them: skipped, not refused as samples without an image."""
    png = encode(Image.new("RGB", (4, 4)), "PNG")
    shard = tmp_path / "mac.tar"
    shard.write_bytes(tar_bytes([
        ("0001.png", png), ("0001.cls", b"3"), ("._0001.png", b"\x00\x05\x16\x07 AppleDouble"),
        (".DS_Store", b"\x00\x00\x00\x01Bud1"), (".thumbnails/0002.png", png),
        ("sub/._0003.png", b"meta"), ("sub/0003.png", png),
    ]))
    dataset = ShardDataset(Storage(), [str(shard)], load_size=S)
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s.key.split("#")[1] for s in samples] == ["0001.png", "sub/0003.png"]
    assert [s.label for s in samples] == [3, -1]


def good_sample() -> tuple[str, bytes]:
    return "000000.png", encode(Image.new("RGB", (4, 4)), "PNG")


def special_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info




class CountedStorage(Storage):
    """A Storage that records what it reads: ``("whole", uri)`` or ``("range", uri)``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reads: list[tuple[str, str]] = []

    def read_bytes(self, uri: str) -> bytes:
        self.reads.append(("whole", uri))
        return super().read_bytes(uri)

    def read_range(self, uri: str, start: int, size: int) -> bytes:
        self.reads.append(("range", uri))
        return super().read_range(uri, start, size)


def indexed_shards(storage: Storage, root: str, count: int = 2, per_shard: int = 6) -> tuple[list[str], dict]:
    """``count`` labelled shards under ``root/shards`` with their indexes beside them; the images by key."""
    shards, images = [], {}
    for s_ in range(count):
        members: list[tuple[str, bytes] | tarfile.TarInfo] = []
        for i in range(per_shard):
            rgb = smooth_rgb(16 + 3 * i, 16, 10 * s_ + i)  # aspects 1 to 1.9
            images[f"{s_}/{i:04d}.png"] = rgb
            members += [(f"{i:04d}.png", encode(Image.fromarray(rgb), "PNG")), (f"{i:04d}.cls", str(s_).encode())]
        uri = join_uri(root, "shards", f"{s_:02d}.tar")
        storage.write_bytes(uri, tar_bytes(members))
        write_shard_index(storage, uri)
        shards.append(uri)
    return shards, images


def test_an_indexed_shard_is_not_read_at_start_and_random_samples_are_read_alone(
        storage_root: tuple[Storage, str]) -> None:
    """With indexes beside the shards, starting reads the indexes only; samples asked in a random
    order (training's) are each read by their byte range; in order (curation's pass), a batch's
    samples of one shard come in one ranged read."""
    plain, root = storage_root
    storage = CountedStorage(plain.s3, plain.retry)
    shards, images = indexed_shards(storage, root)
    storage.reads.clear()
    dataset = ShardDataset(storage, join_uri(root, "shards"), load_size=S, max_aspect=2.0)
    assert {uri for _, uri in storage.reads} == {shard_index_uri(uri) for uri in shards}
    storage.reads.clear()
    for index in (7, 2, 9, 0, 11, 4):  # alternating shards
        sample = dataset[index]
        shard, member = sample.key.split("#")
        want = np.asarray(Image.fromarray(images[f"{shards.index(shard)}/{member}"]).resize(
            (S, S), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        assert_close(sample.image, want)
        assert sample.label == shards.index(shard) and sample.aspect == (16 + 3 * int(member[:4])) / 16
    assert storage.reads == [("range", shards[i // 6]) for i in (7, 2, 9, 0, 11, 4)]
    shard, member = dataset[7].key.split("#")
    with tarfile.open(fileobj=io.BytesIO(plain.read_bytes(shard))) as tar:
        stored = tar.extractfile(member).read()
    uri, offset, size = dataset.location(7)
    assert uri == shard and plain.read_range(uri, offset, size) == stored
    in_order = DataLoader(ShardDataset(storage, shards, load_size=S), batch_size=4, collate_fn=collate_samples)
    storage.reads.clear()
    batches = list(in_order)
    assert [len(b.keys) for b in batches] == [4, 4, 4] and batches[1].labels.tolist() == [0, 0, 1, 1]
    assert storage.reads == [("range", shards[0]), ("range", shards[0]), ("range", shards[1]), ("range", shards[1])]


def test_the_command_indexes_a_folder_of_shards(tmp_path: Path) -> None:
    """``dinoflow shards index``: shards written without indexes get them; a run then reads the
    indexes only to start. A folder without shards, or a broken shard, is named."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    storage = CountedStorage()
    shards, _ = indexed_shards(storage, str(tmp_path), count=2)
    made = [Path(shard_index_uri(uri)).read_bytes() for uri in shards]
    for uri in shards:
        Path(shard_index_uri(uri)).unlink()
    result = CliRunner().invoke(app, ["shards", "index", str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shards"] == 2
    assert [Path(shard_index_uri(uri)).read_bytes() for uri in shards] == made
    storage.reads.clear()
    ShardDataset(storage, str(tmp_path / "shards"), load_size=S)
    assert all(uri.endswith(".index.json") for _, uri in storage.reads)
    empty = CliRunner().invoke(app, ["shards", "index", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "no shards under" in empty.stderr
    (tmp_path / "shards" / "broken.tar").write_bytes(b"not a tar")
    broken = CliRunner().invoke(app, ["shards", "index", str(tmp_path / "shards" / "broken.tar")])
    assert broken.exit_code == 2 and "broken.tar: not a readable uncompressed tar" in broken.stderr


def test_a_stale_index_is_refused_and_one_of_other_extensions_ignored(tmp_path: Path) -> None:
    storage = CountedStorage()
    shards, _ = indexed_shards(storage, str(tmp_path), count=1)
    made = json.loads(Path(shard_index_uri(shards[0])).read_bytes())
    Path(shards[0]).write_bytes(Path(shards[0]).read_bytes() + b"\0" * 512)  # the shard rewritten: a longer tar
    dataset = ShardDataset(storage, shards, load_size=S)
    with pytest.raises(ValueError, match=rf"{made['shard_size']} bytes but .*00.tar holds "
                                         rf"{made['shard_size'] + 512}: the shard changed since; index it again"):
        dataset[0]
    storage.reads.clear()
    only_jpg = ShardDataset(storage, shards, load_size=S, image_extensions=("png", "jpg"))  # another set: indexed anew
    assert ("whole", shards[0]) in storage.reads and len(only_jpg) == 6


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        (("../x.jpg", b"x"), "absolute path or one leaving the archive"),
        (("/etc/x.jpg", b"x"), "absolute path or one leaving the archive"),
        (("a/../../x.jpg", b"x"), "absolute path or one leaving the archive"),
        (special_member("x.jpg", tarfile.SYMTYPE, "/etc/passwd"), "is a symbolic link"),
        (special_member("x.jpg", tarfile.LNKTYPE, "000000.png"), "is a hard link"),
        (special_member("x.jpg", tarfile.CHRTYPE), "is a character device"),
    ],
    ids=["parent", "absolute", "nested-parent", "symlink", "hardlink", "device"],
)
def test_unsafe_members_are_refused(
    storage_root: tuple[Storage, str], member: tuple[str, bytes] | tarfile.TarInfo, problem: str
) -> None:
    storage, root = storage_root
    shard = join_uri(root, "evil.tar")
    storage.write_bytes(shard, tar_bytes([good_sample(), member]))
    name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
    with pytest.raises(ValueError, match=rf"shard {shard}: member '{name}' .*{problem}"):
        ShardDataset(storage, [shard], load_size=S)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("a.jpg", b"x"), ("a.png", b"x")], r"sample 'a' has 2 image members \(jpg, png\); exactly one of"),
        ([("a.cls", b"1")], r"sample 'a' has 0 image members \(none\)"),
        ([good_sample(), ("000000.cls", b"cat")], r"label member '000000.cls' holds b'cat', not an integer"),
    ],
    ids=["two-images", "no-image", "bad-label"],
)
def test_malformed_shards_are_named(tmp_path: Path, members: list[tuple[str, bytes]], message: str) -> None:
    shard = str(tmp_path / "s.tar")
    Path(shard).write_bytes(tar_bytes(members))
    with pytest.raises(ValueError, match=rf"shard {shard}: {message}"):
        ShardDataset(Storage(), [shard], load_size=S)


def test_compressed_missing_or_empty_shards_are_named(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("a.png")
        tar.addfile(info, io.BytesIO(b""))
    shard.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=rf"shard {shard}: not a readable uncompressed tar"):
        ShardDataset(Storage(), [str(shard)], load_size=S)
    empty = tmp_path / "none"
    with pytest.raises(FileNotFoundError, match=rf"no shards under {empty}: allowed are files ending in .tar"):
        ShardDataset(Storage(), str(empty), load_size=S)
    shard.write_bytes(tar_bytes([]))
    with pytest.raises(ValueError, match=rf"no samples in the 1 shard\(s\) starting with {shard}"):
        ShardDataset(Storage(), [str(shard)], load_size=S)
