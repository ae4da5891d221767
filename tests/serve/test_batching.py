"""The dynamic batcher: requests merged up to the batch size, results split back, errors delivered."""

from __future__ import annotations

import threading

import pytest
import torch

from serve.batching import DynamicBatcher


def _recording_forward(sizes: list[int], gate: threading.Event | None = None):
    def forward(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if gate is not None:
            gate.wait(5)
        sizes.append(len(pixels))
        return {"sum": pixels.float().sum(dim=(1, 2, 3)), "first": pixels[:, 0, 0, 0].clone()}
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
        assert first.result(5)["first"].tolist() == [1]
        for value, future in zip((2, 3, 4, 5), futures):
            assert future.result(5)["first"].tolist() == [value, value]
        assert sum(sizes) == 9 and max(sizes) <= 8 and len(sizes) >= 2  # 1 + 3 * 2, then the overflow
    finally:
        batcher.close()


def test_batch_size_one_runs_every_request_alone_and_a_large_request_whole() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(_recording_forward(sizes), max_batch_size=1, max_wait_ms=50)
    try:
        futures = [batcher.submit(_images(v)) for v in range(5)] + [batcher.submit(_images(9, count=3))]
        assert [f.result(5)["first"].tolist() for f in futures] == [[0], [1], [2], [3], [4], [9, 9, 9]]
        assert sizes == [1, 1, 1, 1, 1, 3]
    finally:
        batcher.close()


def test_an_error_reaches_every_waiting_request_and_the_worker_goes_on() -> None:
    calls = {"n": 0}

    def flaky(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return {"x": pixels[:, 0, 0, 0]}

    batcher = DynamicBatcher(flaky, max_batch_size=4, max_wait_ms=0)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.submit(_images(1)).result(5)
        assert batcher.submit(_images(7)).result(5)["x"].tolist() == [7]
    finally:
        batcher.close()


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(lambda x: {}, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        DynamicBatcher(lambda x: {}, max_wait_ms=-1)
