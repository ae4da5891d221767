"""dinoflow.storage against a real S3 server (SeaweedFS on 127.0.0.1) and the local disk."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from dinoflow.storage import (
    PARTIAL_MARKER,
    RetryPolicy,
    Storage,
    StorageError,
    basename,
    claim,
    is_transient,
    join_uri,
)
from tests.servers import TEST_BUCKET, SeaweedS3, running_s3, s3_settings

MIB = 1 << 20


def test_small_round_trip(storage_root: tuple[Storage, str]) -> None:
    storage, root = storage_root
    uri = join_uri(root, "a", "b.txt")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello dinoflow")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello dinoflow"
    assert storage.size(uri) == 14
    storage.write_bytes(uri, b"")
    assert storage.read_bytes(uri) == b""


def test_large_object_round_trip_is_multipart_on_s3(
    storage_root: tuple[Storage, str], tmp_path: Path
) -> None:
    storage, root = storage_root
    payload = os.urandom(50 * MIB)
    source = tmp_path / "big.bin"
    source.write_bytes(payload)
    uri = join_uri(root, "big.bin")
    storage.put_file(source, uri)
    assert storage.size(uri) == len(payload)
    back = storage.get_file(uri, tmp_path / "back" / "big.bin")
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(payload).digest()
    if uri.startswith("s3://"):
        # a multipart upload's ETag ends in -<number of parts>
        etag = storage._s3().info(uri.removeprefix("s3://"))["ETag"].strip('"')
        assert etag.endswith(f"-{-(-len(payload) // storage.part_size)}")


def test_listing(storage_root: tuple[Storage, str]) -> None:
    storage, root = storage_root
    for name in ("x/1.bin", "x/2.bin", "x/deep/3.bin", "y.bin"):
        storage.write_bytes(join_uri(root, name), name.encode())
    assert storage.list(root) == [join_uri(root, "x"), join_uri(root, "y.bin")]
    assert storage.list(join_uri(root, "x"), recursive=True) == [
        join_uri(root, "x/1.bin"),
        join_uri(root, "x/2.bin"),
        join_uri(root, "x/deep/3.bin"),
    ]
    assert storage.list(join_uri(root, "missing")) == []
    storage.delete(join_uri(root, "x"), recursive=True)
    assert storage.list(root, recursive=True) == [join_uri(root, "y.bin")]
    storage.delete(join_uri(root, "y.bin"))
    storage.delete(join_uri(root, "y.bin"))  # deleting what is gone is fine
    assert not storage.exists(join_uri(root, "y.bin"))


def test_a_local_listing_follows_links_to_folders_once(tmp_path: Path) -> None:
    """A data set staged as links to its class folders is listed whole (each linked file under the
    link's name), a link back up the tree listed once and not followed round."""
    storage = Storage()
    for name in ("real/cat/1.jpg", "real/cat/2.jpg", "staged/dog/3.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "staged" / "cat").symlink_to(tmp_path / "real" / "cat", target_is_directory=True)
    (tmp_path / "staged" / "dog" / "up").symlink_to(tmp_path / "staged", target_is_directory=True)
    listed = storage.list(str(tmp_path / "staged"), recursive=True)
    assert listed == [str(tmp_path / "staged" / name) for name in ("cat/1.jpg", "cat/2.jpg", "dog/3.jpg")]
    assert storage.read_bytes(listed[0]) == b"x"
    assert storage.list(str(tmp_path / "nowhere"), recursive=True) == []


def test_a_range_of_an_object_is_read_alone(storage_root: tuple[Storage, str]) -> None:
    storage, root = storage_root
    uri = join_uri(root, "shard.tar")
    payload = bytes(range(256)) * 40
    storage.write_bytes(uri, payload)
    for start, size in ((0, 10), (1000, 512), (10_000, 240), (10_230, 100), (7, 0)):  # (10_230: past the end)
        assert storage.read_range(uri, start, size) == payload[start:start + size], (start, size)
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        storage.read_range(join_uri(root, "gone.tar"), 0, 4)
    with pytest.raises(ValueError, match="start -1 and size 4 must be >= 0"):
        storage.read_range(uri, -1, 4)


def test_missing_object_names_the_uri(storage_root: tuple[Storage, str]) -> None:
    storage, root = storage_root
    uri = join_uri(root, "nope.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes(uri)


def _slow_chunks(payload: bytes, chunk: int, pause_s: float, started: threading.Event | None = None):
    def factory():
        for offset in range(0, len(payload), chunk):
            if started is not None and offset >= 2 * chunk:
                started.set()
            yield payload[offset : offset + chunk]
            time.sleep(pause_s)

    return factory


def test_reader_never_sees_a_partial_object(storage_root: tuple[Storage, str]) -> None:
    storage, root = storage_root
    uri = join_uri(root, "atomic.bin")
    old = b"old version " * 1000
    new = os.urandom(12 * MIB)
    storage.write_bytes(uri, old)
    seen: list[bytes] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(storage.read_bytes(uri))
            seen.extend(storage.read_bytes(u) for u in storage.list(root) if u != uri)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        storage.write_stream(uri, _slow_chunks(new, MIB, 0.1))
    finally:
        done.set()
        reader.join()
    assert storage.read_bytes(uri) == new
    assert len(seen) >= 5, "the reader should have polled while the write was running"
    assert all(data in (old, new) for data in seen)
    assert storage.list(root) == [uri]


def test_failed_write_leaves_previous_version_and_no_debris(storage_root: tuple[Storage, str]) -> None:
    storage, root = storage_root
    uri = join_uri(root, "keep.bin")
    storage.write_bytes(uri, b"good")

    def broken():
        yield os.urandom(6 * MIB)
        yield os.urandom(6 * MIB)  # past one part: a multipart upload is under way on S3
        raise ValueError("producer failed")

    with pytest.raises(StorageError, match="producer failed"):
        storage.write_stream(uri, broken)
    assert storage.read_bytes(uri) == b"good"
    assert storage.list(root) == [uri]
    if uri.startswith("file://"):
        folder = Path(uri.removeprefix("file://")).parent
        assert not [p for p in folder.iterdir() if PARTIAL_MARKER in p.name]


def test_directory_round_trip(storage_root: tuple[Storage, str], tmp_path: Path) -> None:
    storage, root = storage_root
    source = tmp_path / "ckpt"
    (source / "sub").mkdir(parents=True)
    (source / "model.bin").write_bytes(os.urandom(1000))
    (source / "sub" / "meta.json").write_text('{"step": 3}')
    written = storage.upload_dir(source, join_uri(root, "ckpt"))
    assert len(written) == 2
    back = tmp_path / "back"
    storage.download_dir(join_uri(root, "ckpt"), back)
    assert (back / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    assert (back / "sub" / "meta.json").read_text() == '{"step": 3}'


def test_bad_uris_are_rejected() -> None:
    storage = Storage()
    with pytest.raises(StorageError, match="unsupported scheme 'gs'.*allowed"):
        storage.read_bytes("gs://bucket/key")
    with pytest.raises(StorageError, match="names no bucket"):
        storage.read_bytes("s3://")
    with pytest.raises(ValueError, match="part_size"):
        Storage(part_size=1 << 20)


@pytest.mark.parametrize(("uri", "name"), [
    ("s3://bucket/runs/demo/backbone.safetensors", "backbone.safetensors"), ("s3://bucket/runs/demo/", "demo"),
    ("s3://bucket", "bucket"), ("file:///data/train/cat.png", "cat.png"), ("file:///data/train//", "train"),
    ("/data/train/cat.png", "cat.png"), ("relative/folder/", "folder"),
    ("cat.png", "cat.png"), ("cat/", "cat"), ("", ""), ("/", "")])
def test_basename_is_the_last_part_a_trailing_slash_ignored(uri: str, name: str) -> None:
    assert basename(uri) == name


def test_a_claimed_folder_is_resumed_by_the_same_work_and_refused_to_another(
        storage_root: tuple[Storage, str]) -> None:
    """The first claim writes the identity (as JSON: a tuple reads back as a list); the same identity
    passes; another is refused naming each key that differs (a key one side lacks too), with both
    values where both are short (numbers, flags, short texts, None), a digest, a long text or a list
    by name alone, the file left as it was."""
    storage, root = storage_root
    identity = {"load_size": 48, "keys_sha256": "a" * 64, "embedder": "pixels6", "splits": (3, 2), "norm": None,
                "source": "s3://bucket/" + "x" * 40}
    claim(storage, root, identity, "embeddings of another run", file="meta.json")
    written = storage.read_bytes(join_uri(root, "meta.json"))
    claim(storage, root, identity, "embeddings of another run", file="meta.json")
    other = {**identity, "load_size": 40, "keys_sha256": "b" * 64, "embedder": "backbone28", "views": True,
             "splits": [3, 1], "source": "s3://bucket/" + "y" * 40}
    del other["norm"]
    with pytest.raises(ValueError, match=rf"^{re.escape(root)} holds embeddings of another run \(it differs in "
                                         r"embedder \('pixels6' there, 'backbone28' here\), keys_sha256, "
                                         r"load_size \(48 there, 40 here\), norm \(None there, absent here\), "
                                         r"source, splits, views \(absent there, True here\)\): "
                                         r"give another output folder, or delete this one to start over$"):
        claim(storage, root, other, "embeddings of another run", file="meta.json")
    assert storage.read_bytes(join_uri(root, "meta.json")) == written
    assert not storage.exists(join_uri(root, "identity.json"))
    claim(storage, root, {"task": "depth"}, "another head's training")
    with pytest.raises(ValueError, match=r"holds another head's training \(it differs in task \('depth' there, "
                                         r"'other' here\)\)"):
        claim(storage, root, {"task": "other"}, "another head's training")


def test_transient_error_classification() -> None:
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ConnectionRefusedError())
    slow_down = ClientError({"Error": {"Code": "SlowDown", "Message": "slow"}}, "PutObject")
    assert is_transient(slow_down)
    wrapped = OSError("wrapped")
    wrapped.__cause__ = EndpointConnectionError(endpoint_url="x")
    assert is_transient(wrapped)
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject")
    assert not is_transient(denied)
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(ValueError("x"))


@pytest.fixture
def own_s3_server(tmp_path: Path):
    """A server of this test's own, which the test may kill and restart."""
    with running_s3(tmp_path, bucket="") as server:
        yield server


def test_write_survives_a_server_restart(own_s3_server: SeaweedS3) -> None:
    storage = Storage(s3_settings(own_s3_server), RetryPolicy(attempts=8, first_delay_s=0.5, budget_s=60))
    storage.make_bucket(f"s3://{TEST_BUCKET}")
    uri = f"s3://{TEST_BUCKET}/outage/object.bin"
    payload = os.urandom(24 * MIB)
    in_flight = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            storage.write_stream(uri, _slow_chunks(payload, 2 * MIB, 0.1, in_flight))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    writer = threading.Thread(target=write)
    writer.start()
    assert in_flight.wait(30)
    own_s3_server.kill()  # the server dies in the middle of the upload
    time.sleep(1.0)
    own_s3_server.start()  # and comes back with its data
    writer.join(90)
    assert not writer.is_alive()
    assert not errors, errors
    assert storage.read_bytes(uri) == payload


def test_server_gone_for_good_fails_within_budget(own_s3_server: SeaweedS3) -> None:
    budget = 4.0
    storage = Storage(s3_settings(own_s3_server), RetryPolicy(attempts=20, first_delay_s=0.3, budget_s=budget))
    uri = f"s3://{TEST_BUCKET}/gone.bin"
    own_s3_server.kill()
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.write_bytes(uri, b"data")
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert uri in message and "attempts" in message and "EndpointConnectionError" in message
    assert elapsed < budget + storage.s3.connect_timeout_s + 2
