"""Picking up a new champion without a restart: a swappable model slot and a registry poller.

Why a slot read once per forward pass: the batcher calls :meth:`ModelSlot.embed`, which reads the
current model once, so a whole batch runs on one model and a swap lands between two batches; no
lock is held during a forward pass. The batch's requests get that model with their features, so
the classes and version they answer with are those of the model that ran them, even when a swap
landed while they waited (:mod:`serve.batching`). A request decodes its images at the model's
``image_size`` before it is queued, so a swap is refused unless the new model has the same
``image_size`` and ``patch_size`` (pixels decoded for one are then valid for the other, and the
PCA grid is the same).

Why polling: the MLflow registry has no change notifications; :class:`ChampionWatcher` resolves
the alias of ``models:/<name>@<alias>`` every ``every_s`` seconds, loads the exact version it
points at when it moved, and swaps it in. A version that fails to load or does not fit is not
tried again until the alias moves on; the old model keeps serving, and ``/healthz`` shows why.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

from dinoflow.registry import parse_registry_uri
from serve.model import ServedModel, resolve_alias

log = logging.getLogger(__name__)


class ModelSlot:
    """The served model, replaceable between forward passes."""

    def __init__(self, model: ServedModel) -> None:
        self._model = model

    @property
    def current(self) -> ServedModel:
        return self._model

    def embed(self, pixels: Tensor) -> tuple[dict[str, Tensor], ServedModel]:
        """:meth:`ServedModel.embed` of the model current when the batch starts, and that model."""
        model = self._model
        return model.embed(pixels), model

    def attention(self, pixels: Tensor) -> tuple[dict[str, Tensor], ServedModel]:
        """:meth:`ServedModel.attention` of the model current when the batch starts, and that model."""
        model = self._model
        return model.attention(pixels), model

    def swap(self, model: ServedModel) -> ServedModel:
        """Serve ``model`` from the next forward pass on; returns the previous one.

        Raises ``ValueError`` when its ``image_size``, ``patch_size`` or image preparation
        (:attr:`~serve.model.ServedModel.transform`, which a served index was built with) differ from the
        current model's.
        """
        old = self._model
        if (model.image_size, model.patch_size) != (old.image_size, old.patch_size):
            raise ValueError(f"{model.name} v{model.version}: image_size {model.image_size}, patch_size "
                             f"{model.patch_size} differ from the served {old.image_size}, {old.patch_size}; "
                             "restart the service to change them")
        if model.transform != old.transform:
            raise ValueError(f"{model.name} v{model.version}: its images are prepared as {model.transform!r}, the "
                             f"served model's as {old.transform!r}; restart the service to change it")
        self._model = model  # one reference assignment: atomic for the batcher thread
        return old


@dataclasses.dataclass
class ReloadStatus:
    """What ``/healthz`` shows of the watcher."""

    every_s: float
    polls: int = 0
    swaps: int = 0
    last_error: str | None = None


class ChampionWatcher:
    """Polls the alias of ``uri`` and swaps a newly aliased version into ``slot``.

    Args:
        slot: the service's model slot; its current model came from ``uri``.
        uri: ``models:/<name>@<alias>``.
        every_s: seconds between polls.
        load: a model URI (``models:/<name>/<version>``) -> :class:`ServedModel` (the CLI's image
            size, device and storage).
        resolve: ``(name, alias)`` -> the version the alias points at (the registry, by default).
    """

    def __init__(self, slot: ModelSlot, uri: str, every_s: float, load: Callable[[str], ServedModel],
                 resolve: Callable[[str, str], str] = resolve_alias) -> None:
        parsed = parse_registry_uri(uri)
        if parsed is None or parsed[1] is None:
            raise ValueError(f"reloading needs a registry alias URI models:/<name>@<alias>, got {uri!r}")
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.slot, self.uri, self.load, self.resolve = slot, uri, load, resolve
        self.name, self.alias = parsed[0], parsed[1]
        self.status = ReloadStatus(every_s)
        self._refused: str | None = None  # a version that failed: not retried until the alias moves
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dinoflow-champion-watcher", daemon=True)

    def poll(self) -> bool:
        """Check the alias once; True when a new version was swapped in."""
        self.status.polls += 1
        try:
            version = self.resolve(self.name, self.alias)
        except Exception as err:  # noqa: BLE001 - a registry outage must not stop the service
            self.status.last_error = f"resolving {self.uri}: {type(err).__name__}: {err}"
            return False
        if version in (self.slot.current.version, self._refused):
            return False
        try:
            loaded = self.load(f"models:/{self.name}/{version}")
            old = self.slot.swap(dataclasses.replace(loaded, name=self.uri, version=version))
        except Exception as err:  # noqa: BLE001 - keep serving the old model, say why
            self._refused = version
            self.status.last_error = f"version {version} not served: {type(err).__name__}: {err}"
            log.warning("champion watcher: %s", self.status.last_error)
            return False
        self._refused, self.status.last_error = None, None
        self.status.swaps += 1
        log.warning("champion watcher: %s moved from version %s to %s; now serving %s", self.uri, old.version,
                    version, version)
        return True

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.status)

    def _run(self) -> None:
        next_poll = time.monotonic() + self.status.every_s
        while not self._stop.wait(max(next_poll - time.monotonic(), 0)):
            self.poll()
            next_poll = time.monotonic() + self.status.every_s
