"""The S3 server dies during a training run that reads its shards from S3 and checkpoints to S3.

A real SeaweedFS server of this module's own is SIGKILLed while the run is between checkpoints
and started again on the same ports and data. A short outage is ridden over by the storage
retries: the run ends with the uninterrupted run's weights. An outage longer than the retry
budget stops the run with an error naming the operation and the ``s3://`` URI; the checkpoints
left are whole, and a rerun resumes from them to the same end.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dinoflow.storage import RetryPolicy, Storage, StorageError, join_uri
from tests.reliability.helpers import (
    assert_same_training_state,
    image_shard,
    one_torch_thread,
    tiny_config,
)
from tests.servers import TEST_BUCKET, SeaweedS3, running_s3, s3_settings
from trainer.checkpoints import latest_checkpoint_uri, load_latest_checkpoint
from trainer.run import run_pretrain

SHARDS, PER_SHARD = 4, 8
# 16 steps of 4 images drawn across 4 shards with one cached: nearly every image is an S3 read
OVERRIDES = ["optim.epochs=4", "checkpoint_every=2", "data.kind=shards", "seed=5"]
STEPS = 16


class CountingStorage(Storage):
    """A Storage that records every failed attempt it retried or gave up on (op, URI, error)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failures: list[tuple[str, str, str]] = []

    def _call(self, op, uri, fn):
        def attempt():
            try:
                return fn()
            except Exception as err:
                self.failures.append((op, uri, type(err).__name__))
                raise

        return super()._call(op, uri, attempt)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A server of this module's own, which its tests kill and restart."""
    with running_s3(tmp_path_factory.mktemp("s3-outage")) as server:
        yield server


@pytest.fixture(scope="module")
def shards(server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The same shards on S3 and in a local folder: (s3 folder URI, local folder)."""
    local = tmp_path_factory.mktemp("shards")
    storage = Storage(s3_settings(server))
    uri = f"s3://{TEST_BUCKET}/outage-shards"
    for index in range(SHARDS):
        data = image_shard(index * PER_SHARD, PER_SHARD)
        (local / f"shard-{index}.tar").write_bytes(data)
        storage.write_bytes(join_uri(uri, f"shard-{index}.tar"), data)
    return uri, local


@pytest.fixture(scope="module")
def reference(shards: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The last checkpoint of the same run on local files, with no outage."""
    out = tmp_path_factory.mktemp("s3-outage-reference")
    cfg = tiny_config(str(out), *OVERRIDES, f"data.uri={shards[1]}")
    from dinoflow.tracking import NullTracker

    assert run_pretrain(cfg, Storage(), NullTracker(), evaluate=False)["steps"] == STEPS
    checkpoint = load_latest_checkpoint(Storage(), str(out))
    assert checkpoint is not None
    return checkpoint


def kill_at_checkpoint(server: SeaweedS3, out: str, step: int, down_s: float | None,
                       events: dict[str, float]) -> threading.Thread:
    """A thread that kills the server once checkpoint ``step`` of ``out`` is written, and starts
    it again ``down_s`` later (never, if None); it notes when in ``events``."""
    probe = Storage(s3_settings(server), RetryPolicy(attempts=1))
    pointer = join_uri(out, "checkpoints", "latest.json")

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if probe.exists(pointer) and json.loads(probe.read_bytes(pointer))["step"] >= step:
                break
            time.sleep(0.02)
        server.kill()
        events["killed"] = time.monotonic()
        if down_s is not None:
            time.sleep(down_s)
            server.start()
            events["restarted"] = time.monotonic()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def assert_only_whole_checkpoints(storage: Storage, out: str) -> dict:
    """The checkpoint folder lists only step files and the pointer; the pointer names a listed
    checkpoint, which loads; nothing else (no temp or partial object) is visible."""
    folder = join_uri(out, "checkpoints")
    listed = storage.list(folder)
    names = [uri.rsplit("/", 1)[-1] for uri in listed]
    assert "latest.json" in names and all(n == "latest.json" or (n.startswith("step_") and n.endswith(".pt"))
                                          for n in names), names
    raw = storage._s3().ls(folder.removeprefix("s3://"), detail=False)  # the store's own listing
    assert sorted(p.rsplit("/", 1)[-1] for p in raw) == sorted(names), raw
    pointer = json.loads(storage.read_bytes(join_uri(folder, "latest.json")))
    assert latest_checkpoint_uri(storage, out) in listed
    checkpoint = load_latest_checkpoint(storage, out)
    assert checkpoint is not None and checkpoint["step"] == pointer["step"]
    return checkpoint


def test_a_short_s3_outage_is_ridden_over(server: SeaweedS3, shards: tuple[str, Path], reference: dict) -> None:
    """The server is down for about 1 s plus its restart; the run goes on and ends as if nothing happened."""
    from dinoflow.tracking import NullTracker

    out = f"s3://{TEST_BUCKET}/outage-short"
    storage = CountingStorage(s3_settings(server), RetryPolicy(attempts=12, first_delay_s=0.3, max_delay_s=3,
                                                                budget_s=90))
    cfg = tiny_config(out, *OVERRIDES, f"data.uri={shards[0]}")
    events: dict[str, float] = {}
    watcher = kill_at_checkpoint(server, out, 4, 1.0, events)
    summary = run_pretrain(cfg, storage, NullTracker(), evaluate=False)
    ended = time.monotonic()
    watcher.join(60)
    assert "restarted" in events, "the server never came back"
    assert events["killed"] < ended, "the run ended before the outage"
    assert storage.failures, "no storage call met the outage"
    assert all(uri.startswith("s3://") for _, uri, _ in storage.failures)
    assert summary["steps"] == STEPS
    got = assert_only_whole_checkpoints(storage, out)
    assert_same_training_state(got, reference, "after a short outage")


def test_an_s3_outage_past_the_retry_budget_fails_naming_the_uri_and_a_rerun_resumes(
    server: SeaweedS3, shards: tuple[str, Path], reference: dict
) -> None:
    from dinoflow.tracking import NullTracker

    if server.process is None or server.process.poll() is not None:
        server.start()
    out = f"s3://{TEST_BUCKET}/outage-long"
    budget = 3.0
    storage = Storage(s3_settings(server), RetryPolicy(attempts=20, first_delay_s=0.3, max_delay_s=1,
                                                       budget_s=budget))
    cfg = tiny_config(out, *OVERRIDES, f"data.uri={shards[0]}")
    events: dict[str, float] = {}
    watcher = kill_at_checkpoint(server, out, 6, None, events)
    with pytest.raises(StorageError) as caught:
        run_pretrain(cfg, storage, NullTracker(), evaluate=False)
    failed = time.monotonic()
    watcher.join(10)
    message = str(caught.value)
    # the operation, the object, the attempts and the cause, in one message
    assert message.split(" ", 1)[0] in ("read", "write", "list", "exists", "delete"), message
    assert f"s3://{TEST_BUCKET}/" in message and "attempts" in message and "EndpointConnectionError" in message
    assert failed - events["killed"] < budget + 2 * storage.s3.connect_timeout_s + 5, "gave up too late"

    server.start()
    saved = assert_only_whole_checkpoints(storage, out)
    assert 6 <= saved["step"] < STEPS
    summary = run_pretrain(cfg, storage, NullTracker(), evaluate=False)  # the rerun resumes there
    assert summary["steps"] == STEPS
    got = assert_only_whole_checkpoints(storage, out)
    assert_same_training_state(got, reference, f"resumed from step {saved['step']} after a failed run")
