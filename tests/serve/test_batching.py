"""The dynamic batcher: requests merged up to the batch size, results split back, errors delivered,
the queue bounded and a timed-out request dropped."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from serve.batching import DynamicBatcher, Overloaded, RequestTimeout


def _recording_forward(sizes: list[int], gate: threading.Event | None = None):
    """A forward pass that records its batch sizes and says it ran as ``batch <n>``."""
    def forward(pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], str]:
        if gate is not None:
            gate.wait(5)
        sizes.append(len(pixels))
        return {"sum": pixels.float().sum(dim=(1, 2, 3)), "first": pixels[:, 0, 0, 0].clone()}, f"batch {len(sizes)}"
    return forward


def _images(value: int, count: int = 1) -> torch.Tensor:
    return torch.full((count, 3, 2, 2), value, dtype=torch.uint8)


def test_concurrent_requests_share_a_forward_pass_and_get_their_own_rows() -> None:
    sizes: list[int] = []
    gate = threading.Event()
    batcher = DynamicBatcher(_recording_forward(sizes, gate), max_batch_size=8, max_wait_ms=200)
    try:
        first = batcher.submit(_images(1))  # the worker takes it and waits for more
        futures = [batcher.submit(_images(value, count=2)) for value in (2, 3, 4, 5)]
        gate.set()
        assert first.result(5)[0]["first"].tolist() == [1]
        for value, future in zip((2, 3, 4, 5), futures):
            assert future.result(5)[0]["first"].tolist() == [value, value]
        assert sum(sizes) == 9 and max(sizes) <= 8 and len(sizes) >= 2  # 1 + 3 * 2, then the overflow
    finally:
        batcher.close()


def test_every_request_gets_what_ran_its_batch() -> None:
    """The service's forward pass returns the model that ran it: each request of a batch gets that
    one, so a request answers with the classes and version of the model that computed its features."""
    sizes: list[int] = []
    gate = threading.Event()
    batcher = DynamicBatcher(_recording_forward(sizes, gate), max_batch_size=8, max_wait_ms=0)
    try:
        first = batcher.submit(_images(1))
        _wait_until(lambda: batcher.queued == 0)  # the worker holds it, blocked on the gate
        later = [batcher.submit(_images(value)) for value in (2, 3)]
        gate.set()
        assert first.result(5)[1] == "batch 1"
        assert [future.result(5)[1] for future in later] == ["batch 2", "batch 2"] and sizes == [1, 2]
        assert [future.result(5)[0]["first"].tolist() for future in later] == [[2], [3]]
    finally:
        gate.set()
        batcher.close()


def test_batch_size_one_runs_every_request_alone_and_a_large_request_whole() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(_recording_forward(sizes), max_batch_size=1, max_wait_ms=50)
    try:
        futures = [batcher.submit(_images(v)) for v in range(5)] + [batcher.submit(_images(9, count=3))]
        assert [f.result(5)[0]["first"].tolist() for f in futures] == [[0], [1], [2], [3], [4], [9, 9, 9]]
        assert sizes == [1, 1, 1, 1, 1, 3]
    finally:
        batcher.close()


def test_an_error_reaches_every_waiting_request_and_the_worker_goes_on() -> None:
    calls = {"n": 0}

    def flaky(pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return {"x": pixels[:, 0, 0, 0]}, None

    batcher = DynamicBatcher(flaky, max_batch_size=4, max_wait_ms=0)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.submit(_images(1)).result(5)
        assert batcher.submit(_images(7)).result(5)[0]["x"].tolist() == [7]
    finally:
        batcher.close()


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(lambda x: ({}, None), max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        DynamicBatcher(lambda x: ({}, None), max_wait_ms=-1)


def _wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_a_full_queue_refuses_at_once_and_drains() -> None:
    sizes: list[int] = []
    gate = threading.Event()
    batcher = DynamicBatcher(_recording_forward(sizes, gate), max_batch_size=1, max_wait_ms=0, max_queue=2)
    try:
        running = batcher.submit(_images(1))
        _wait_until(lambda: batcher.queued == 0)  # the worker holds it, blocked on the gate
        waiting = [batcher.submit(_images(2)), batcher.submit(_images(3))]
        assert batcher.full and batcher.queued == 2
        with pytest.raises(Overloaded, match=r"2 requests are waiting for the model \(the limit is 2\)"):
            batcher.submit(_images(4))
        gate.set()
        assert [f.result(5)[0]["first"].tolist() for f in [running, *waiting]] == [[1], [2], [3]]
        assert batcher.submit(_images(5)).result(5)[0]["first"].tolist() == [5]  # room again
        assert not batcher.full
    finally:
        gate.set()
        batcher.close()


def test_a_timed_out_request_is_dropped_from_the_queue() -> None:
    sizes: list[int] = []
    gate = threading.Event()
    batcher = DynamicBatcher(_recording_forward(sizes, gate), max_batch_size=1, max_wait_ms=0, timeout_s=0.1)

    async def two_requests() -> list[BaseException | dict]:
        first = asyncio.ensure_future(batcher.run(_images(1)))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(batcher.run(_images(2)))
        return await asyncio.gather(first, second, return_exceptions=True)

    try:
        outcomes = asyncio.run(two_requests())
        assert all(isinstance(outcome, RequestTimeout) for outcome in outcomes)
        assert "request timeout of 0.1 s" in str(outcomes[0])
        gate.set()  # the first forward pass ends; the second request was cancelled while queued
        assert batcher.submit(_images(7)).result(5)[0]["first"].tolist() == [7]
        assert sizes == [1, 1]  # request 1 and request 7 ran; request 2 never did
    finally:
        gate.set()
        batcher.close()


def test_queue_and_timeout_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        DynamicBatcher(lambda x: ({}, None), max_queue=0)
    with pytest.raises(ValueError, match="timeout_s"):
        DynamicBatcher(lambda x: ({}, None), timeout_s=0)
