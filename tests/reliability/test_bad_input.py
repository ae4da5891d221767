"""Bad images and shards: undecodable images become skipped samples, broken or hostile shards
are refused at indexing with a message naming the shard and the member."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dinoflow.storage import Storage
from tests.reliability.helpers import jpeg_bytes, png_bytes
from trainer.data.datasets import BadImageTracker, ImageFolderDataset, collate_samples, decode_image
from trainer.data.shards import ShardDataset, _index_shard
from trainer.data.fashion_mnist import parse_idx


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels in a few hundred bytes (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_IMAGES = {
    "zero-byte": b"",
    "garbage": b"this is not an image" * 20,
    "truncated-jpeg": jpeg_bytes(64, 64)[:300],
    "truncated-png": png_bytes(64, 64)[:60],
    "huge-header": huge_png_header(100_000, 100_000),
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_decode_to_none(name: str) -> None:
    assert decode_image(BAD_IMAGES[name], load_size=16) is None


def test_good_images_still_decode() -> None:
    for data in (jpeg_bytes(30, 20), png_bytes(20, 40, "RGBA"), png_bytes(10, 10, "L")):
        image = decode_image(data, load_size=16)
        assert image is not None and tuple(image.shape) == (3, 16, 16)


def test_max_pixels_applies_before_decoding() -> None:
    assert decode_image(png_bytes(100, 100), load_size=16, max_pixels=9_999) is None
    assert decode_image(png_bytes(100, 100), load_size=16, max_pixels=10_000) is not None


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise_from_decode(data: bytes) -> None:
    image = decode_image(data, load_size=8)
    assert image is None or tuple(image.shape) == (3, 8, 8)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=2000))
def test_cut_images_never_raise(cut: int) -> None:
    for data in (jpeg_bytes(40, 40), png_bytes(40, 40)):
        image = decode_image(data[:cut], load_size=8)
        assert image is None or tuple(image.shape) == (3, 8, 8)


def test_a_folder_of_bad_images_is_skipped_then_fails_the_run(tmp_path: Path) -> None:
    root = tmp_path / "images" / "cls"
    root.mkdir(parents=True)
    (root / "good.jpg").write_bytes(jpeg_bytes())
    for name, data in BAD_IMAGES.items():
        (root / f"{name}.png").write_bytes(data)
    dataset = ImageFolderDataset(Storage(), str(tmp_path / "images"), load_size=16)
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    assert batch.keys == [str(root / "good.jpg")] and len(batch.bad_keys) == len(BAD_IMAGES)
    tracker = BadImageTracker(max_fraction=0.5, min_seen=1)
    tracker.update(batch)
    with pytest.raises(ValueError, match=r"6 of 7 images \(85\.7%\) could not be decoded.*examples: "):
        tracker.check()


def make_shard(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def file_member(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def link_member(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


HOSTILE = {
    "parent": ([(file_member("../escape.jpg"), jpeg_bytes())], "leaving the archive"),
    "nested-parent": ([(file_member("a/../../escape.jpg"), jpeg_bytes())], "leaving the archive"),
    "absolute": ([(file_member("/etc/evil.jpg"), jpeg_bytes())], "absolute path"),
    "symlink": ([(link_member("s.jpg", tarfile.SYMTYPE, "/etc/passwd"), b"")], "symbolic link"),
    "hardlink": ([(link_member("h.jpg", tarfile.LNKTYPE, "../../x"), b"")], "hard link"),
    "device": ([(link_member("d.jpg", tarfile.CHRTYPE, ""), b"")], "character device"),
    "fifo": ([(link_member("f.jpg", tarfile.FIFOTYPE, ""), b"")], "FIFO"),
    "duplicate": ([(file_member("x.jpg"), jpeg_bytes()), (file_member("x.jpg"), jpeg_bytes())], "appears twice"),
    "two-images": ([(file_member("x.jpg"), jpeg_bytes()), (file_member("x.png"), png_bytes())], "2 image members"),
    "bad-label": ([(file_member("x.jpg"), jpeg_bytes()), (file_member("x.cls"), b"\xff\xfe")], "not an integer"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_shards_are_refused_naming_the_member(tmp_path: Path, case: str) -> None:
    members, reason = HOSTILE[case]
    shard = tmp_path / "shard-0.tar"
    shard.write_bytes(make_shard(members))
    with pytest.raises(ValueError, match=f"shard {shard}: .*{reason}"):
        ShardDataset(Storage(), [str(shard)], load_size=16)


@pytest.mark.parametrize("cut", ["zero", "header", "first-member", "last-member"])
def test_truncated_shards_are_refused(tmp_path: Path, cut: str) -> None:
    data = make_shard([(file_member(f"{i}.jpg"), jpeg_bytes()) for i in range(3)])
    # members: headers at 0, 1536, 3072; image bytes (991) at 512, 2048, 3584
    size = {"zero": 0, "header": 100, "first-member": 512 + 400, "last-member": 3584 + 400}[cut]
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[:size])
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        ShardDataset(Storage(), [str(shard)], load_size=16)


def test_a_shard_cut_after_its_last_member_keeps_every_sample(tmp_path: Path) -> None:
    """Only the end-of-archive padding lost: every member is whole, so nothing is refused."""
    data = make_shard([(file_member(f"{i}.jpg"), jpeg_bytes()) for i in range(3)])
    shard = tmp_path / "padless.tar"
    shard.write_bytes(data[: 3584 + 1024])
    dataset = ShardDataset(Storage(), [str(shard)], load_size=16)
    assert len(collate_samples([dataset[i] for i in range(len(dataset))]).keys) == 3


def test_bad_images_inside_a_good_shard_are_skipped(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    shard.write_bytes(make_shard([(file_member("a.jpg"), jpeg_bytes()), (file_member("b.jpg"), b""),
                                  (file_member("c.png"), BAD_IMAGES["huge-header"])]))
    dataset = ShardDataset(Storage(), str(tmp_path), load_size=16)
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    assert batch.keys == [f"{shard}#a.jpg"] and batch.bad_keys == [f"{shard}#b.jpg", f"{shard}#c.png"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_shard_bytes_raise_only_value_error(data: bytes) -> None:
    try:
        _index_shard("fuzz.tar", data, {"jpg", "png"})
    except ValueError as err:
        assert "fuzz.tar" in str(err)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="ab./", min_size=1, max_size=12), min_size=1, max_size=4))
def test_member_names_never_escape(names: list[str]) -> None:
    """Any accepted member name is relative and free of '..' (the manifest of a shard is its member list)."""
    members = [(file_member(name), jpeg_bytes(4, 4)) for name in names]
    try:
        data = make_shard(members)
    except (ValueError, OSError):
        return  # tarfile itself refuses the name
    try:
        samples = _index_shard("fuzz.tar", data, {"jpg", "png", "a", "b"})
    except ValueError:
        return
    for sample in samples:
        assert not sample.name.startswith("/") and ".." not in sample.name.split("/")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_random_idx_bytes_raise_only_value_error(data: bytes) -> None:
    try:
        parse_idx(data, "fuzz.idx")
    except ValueError as err:
        assert "fuzz.idx" in str(err)


def test_truncated_idx_body_is_refused() -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">III", 10, 28, 28)
    with pytest.raises(ValueError, match="fuzz.idx"):
        parse_idx(header + b"\0" * 100, "fuzz.idx")
