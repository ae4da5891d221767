"""Dynamic batching: concurrent requests merged into one forward pass by a worker thread.

Why a thread and not the event loop: the forward pass holds the CPU (or waits on the GPU) for
milliseconds; run on the loop it would stall every other request, health checks included. The
event loop only enqueues and awaits a future.

The worker takes the first waiting request, then keeps taking requests until the batch holds
``max_batch_size`` images or ``max_wait_ms`` has passed since it took the first one; a request
that would overflow the batch waits for the next one (a single request larger than the batch runs
alone). ``max_batch_size=1`` turns batching off: every request runs alone, in arrival order.

Overload is bounded, never queued without limit: at most ``max_queue`` requests wait for the worker
(one more raises :class:`Overloaded` at once), and :meth:`DynamicBatcher.run` gives up after
``timeout_s`` (:class:`RequestTimeout`), cancelling its job so the worker skips it. The service
turns both into a 503 that says so; the worker, and every other request, go on.

Why ``forward`` returns what ran a batch beside its outputs, handed to each request with its rows:
the model may be swapped while a request waits in the queue (:mod:`serve.reload`), so a request
must read its class names and version from the model that computed its features, not from the one
current when it was queued or answered.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import Tensor

Ran = TypeVar("Ran")  # what ran a batch (the service: its model)
Forward = Callable[[Tensor], tuple[dict[str, Tensor], Ran]]


class Overloaded(RuntimeError):
    """The queue holds ``max_queue`` requests already; the message says so."""


class RequestTimeout(TimeoutError):
    """A request waited longer than its timeout for the model (queue plus forward pass)."""


@dataclass
class _Job:
    pixels: Tensor  # (n, 3, S, S) uint8
    future: Future = field(default_factory=Future)


class DynamicBatcher(Generic[Ran]):
    """Runs ``forward`` on batches of the images submitted from any thread or event loop.

    Args:
        forward: uint8 ``(B, 3, S, S)`` -> (dict of tensors whose first axis is ``B``, what ran the
            batch: given as it is to every request of the batch with its rows).
        max_batch_size: most images in one forward pass (1: no batching).
        max_wait_ms: longest wait for more requests after the first one of a batch.
        on_batch: called with the number of images of each batch run (metrics).
        max_queue: most requests waiting for the worker (None: no limit).
        timeout_s: longest wait of :meth:`run` for its features (None: no limit).
    """

    def __init__(self, forward: Forward[Ran], max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None, max_queue: int | None = None,
                 timeout_s: float | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {max_queue}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._queued = 0  # jobs put and not yet taken by the worker (cancelled ones included)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="dinoflow-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for the worker now."""
        return self._queued

    @property
    def full(self) -> bool:
        """Whether :meth:`submit` would raise :class:`Overloaded` now."""
        return self.max_queue is not None and self._queued >= self.max_queue

    def submit(self, pixels: Tensor) -> Future:
        """Queue uint8 images ``(n, 3, S, S)``; the future gives their slice of the features and what ran them.

        Raises :class:`Overloaded` when ``max_queue`` requests are waiting already.
        """
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        job = _Job(pixels)
        with self._lock:
            if self.full:
                raise Overloaded(f"the service is busy: {self._queued} requests are waiting for the model "
                                 f"(the limit is {self.max_queue}); retry later")
            self._queued += 1
        self._queue.put(job)
        return job.future

    async def run(self, pixels: Tensor) -> tuple[dict[str, Tensor], Ran]:
        """``submit`` for an event loop: await the features of ``pixels`` and what ran them, at most ``timeout_s``.

        Raises :class:`Overloaded`, or :class:`RequestTimeout` (the job is cancelled: if it still
        waits in the queue, the worker drops it).
        """
        future = self.submit(pixels)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise RequestTimeout(f"no features within the request timeout of {self.timeout_s:g} s: the model is "
                                 "overloaded; retry later") from None

    def close(self) -> None:
        """Finish the queued jobs and stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _take(self, timeout: float | None = None) -> _Job | None:
        """The next queued job (``queue.Empty`` after ``timeout``; 0 means do not wait)."""
        job = self._queue.get_nowait() if timeout == 0 else self._queue.get(timeout=timeout)
        if job is not None:
            with self._lock:
                self._queued -= 1
        return job

    def _work(self) -> None:
        carried: _Job | None = None
        while True:
            first = carried or self._take()
            carried = None
            if first is None:
                return
            if not first.future.set_running_or_notify_cancel():
                continue  # timed out while it waited
            jobs, count = [first], len(first.pixels)
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while count < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    job = self._take(max(remaining, 0))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                if count + len(job.pixels) > self.max_batch_size:
                    carried = job
                    break
                if not job.future.set_running_or_notify_cancel():
                    continue  # timed out while it waited
                jobs.append(job)
                count += len(job.pixels)
            self._run(jobs, count)
            if stop:
                return

    def _run(self, jobs: list[_Job], count: int) -> None:
        try:
            outputs, ran = self.forward(torch.cat([job.pixels for job in jobs]))  # each output (count, ...)
        except Exception as err:  # noqa: BLE001 - every waiting request gets the error
            for job in jobs:
                job.future.set_exception(err)
            return
        if self.on_batch is not None:
            self.on_batch(count)
        start = 0
        for job in jobs:
            end = start + len(job.pixels)
            job.future.set_result(({name: value[start:end] for name, value in outputs.items()}, ran))
            start = end
