"""Overload on 127.0.0.1 (real uvicorn, tiny limits): a clear 503, and the service keeps serving."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests
import torch

from serve.app import ServeSettings, create_app
from serve.model import ServedModel

from .conftest import Running, start_server


@dataclass
class SlowModel(ServedModel):
    """The served model, ``delay_s`` slower per forward pass (a stand-in for a big model on a busy GPU)."""

    delay_s: float = 0.0
    forward_calls: int = 0
    idle: threading.Event = field(default_factory=threading.Event)

    def embed(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.idle.clear()
        self.forward_calls += 1
        time.sleep(self.delay_s)
        try:
            return super().embed(pixels)
        finally:
            self.idle.set()

    attention_delay_s: float = 0.0

    def attention(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        time.sleep(self.attention_delay_s)
        return super().attention(pixels)


@pytest.fixture
def slow_service(served_model: ServedModel, service: Running, request: pytest.FixtureRequest) -> Iterator[tuple]:
    """The tiny model behind a service with tiny limits (``request.param``: ServeSettings overrides)."""
    slow = SlowModel(served_model.backbone, served_model.patch_size, served_model.image_size, served_model.name)
    settings = ServeSettings(max_batch_size=1, max_wait_ms=0, **request.param)
    server, thread, url = start_server(create_app(slow, None, settings))
    yield slow, url, service.images
    server.should_exit = True
    thread.join(timeout=10)


def _embed(url: str, image: bytes, route: str = "/v1/embed") -> requests.Response:
    return requests.post(url + route, files=[("images", ("x.png", image, "image/png"))], timeout=30)


def _served_and_refused(responses: list[requests.Response]) -> tuple[list[int], requests.Response]:
    """The sorted statuses of ``responses``, some served and the others refused as busy at a queue of
    1 (asserted), and one refused response."""
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) == {200, 503}, statuses
    busy = next(response for response in responses if response.status_code == 503)
    assert "the service is busy" in busy.json()["detail"] and "the limit is 1" in busy.json()["detail"]
    return statuses, busy


@pytest.mark.parametrize("slow_service", [{"max_queue": 1, "request_timeout_s": 30}], indirect=True)
def test_a_full_queue_gets_503_and_the_service_recovers(slow_service: tuple) -> None:
    slow, url, images = slow_service
    image = images[0].read_bytes()
    slow.delay_s = 1.0
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _embed(url, image), range(8)))
    statuses, busy = _served_and_refused(responses)
    assert busy.headers["retry-after"] == "1"
    assert slow.forward_calls == statuses.count(200)  # refused requests never reached the model

    slow.delay_s = 0.0
    assert slow.idle.wait(10)
    assert _embed(url, image).status_code == 200
    health = requests.get(url + "/healthz", timeout=10).json()
    assert health["queue"] == {"queued": 0, "max_queue": 1, "request_timeout_s": 30}
    metrics = requests.get(url + "/metrics", timeout=10).text
    rejected = re.search(r'^dinoflow_serve_rejected_total\{reason="queue_full"\} (\S+)$', metrics, re.MULTILINE)
    assert rejected and float(rejected.group(1)) == statuses.count(503)
    assert re.search(r"^dinoflow_serve_queued_requests 0\.0$", metrics, re.MULTILINE)


@pytest.mark.parametrize("slow_service", [{"max_queue": 1, "request_timeout_s": 30}], indirect=True)
def test_attention_maps_queue_apart_from_the_features_and_are_bounded_alike(slow_service: tuple) -> None:
    slow, url, images = slow_service
    image = images[0].read_bytes()
    slow.attention_delay_s = 1.0
    with ThreadPoolExecutor(6) as pool:
        looks = [pool.submit(_embed, url, image, "/v1/attention") for _ in range(6)]
        time.sleep(0.5)  # one map being drawn, one waiting: the attention queue is full
        embedded = _embed(url, image)
        responses = [look.result() for look in looks]
    assert embedded.status_code == 200, embedded.text  # the features' queue is another one
    _served_and_refused(responses)


@pytest.mark.parametrize("slow_service", [{"max_queue": 4, "request_timeout_s": 0.3}], indirect=True)
def test_a_slow_forward_pass_times_out_with_503_and_the_queue_drops_it(slow_service: tuple) -> None:
    slow, url, images = slow_service
    image = images[0].read_bytes()
    slow.delay_s = 1.5
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_embed, url, image)
        time.sleep(0.1)  # the first one is in the forward pass; the second one waits behind it
        second = pool.submit(_embed, url, image)
        responses = [first.result(), second.result()]
    for response in responses:
        assert response.status_code == 503, response.text
        assert "no features within the request timeout of 0.3 s" in response.json()["detail"]
    slow.delay_s = 0.0
    assert slow.idle.wait(10)  # the first forward pass ends (its result is thrown away)
    assert _embed(url, image).status_code == 200
    assert slow.forward_calls == 2  # the first request and the last; the second was dropped from the queue
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert re.search(r'^dinoflow_serve_rejected_total\{reason="timeout"\} 2\.0$', metrics, re.MULTILINE)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        ServeSettings(max_queue=0)
    with pytest.raises(ValueError, match="request_timeout_s must be > 0"):
        ServeSettings(request_timeout_s=0)
    with pytest.raises(ValueError, match="reload_every_s must be >= 0"):
        ServeSettings(reload_every_s=-1)
