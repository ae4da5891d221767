"""Shared pieces of the reliability suite: a pickle that runs code, tiny configs, in-memory data."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dinoflow.config import PretrainConfig, load_config
from trainer.data.datasets import Sample

# A pretraining recipe small enough for a few CPU steps a second
TINY_OVERRIDES = [
    "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=1", "model.drop_path_rate=0.0",
    "heads.num_prototypes=32", "heads.hidden_dim=16", "heads.bottleneck_dim=8", "heads.num_layers=2",
    "crops.load_size=16", "crops.global_crop_size=16", "crops.local_crop_size=8", "crops.num_local_crops=2",
    "crops.blur_kernel_size=3", "crops.highres_global_crop_size=16", "crops.highres_local_crop_size=8",
    "optim.batch_size=4", "optim.epoch_length=4", "optim.epochs=2", "optim.warmup_epochs=0",
    "data.max_bad_fraction=1.0",
]


def tiny_config(out: str, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [*TINY_OVERRIDES, f"out={out}", *overrides])


class RandomImages(torch.utils.data.Dataset):
    """``length`` random uint8 images ``(3, size, size)``, seeded by index."""

    def __init__(self, length: int = 16, size: int = 16) -> None:
        self.length, self.size = length, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng(index)
        image = torch.from_numpy(rng.integers(0, 256, (3, self.size, self.size), dtype=np.uint8))
        return Sample(image=image, label=index % 2, key=f"mem#{index}")


class CodePayload:
    """Unpickling this runs ``open(marker, 'w').write('pwned')``: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def malicious_checkpoint(marker: Path, wrap: str | None = None) -> bytes:
    """A torch checkpoint whose state dict holds real tensors and one code payload."""
    state = {"cls_token": torch.zeros(1, 1, 8), "payload": CodePayload(marker)}
    buffer = io.BytesIO()
    torch.save({wrap: state} if wrap else state, buffer)
    return buffer.getvalue()


def png_bytes(width: int = 20, height: int = 20, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=0).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int = 20, height: int = 20) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def assert_not_run(marker: Path) -> None:
    assert not os.path.exists(marker), "the checkpoint's pickled code ran"


def train_tiny(out: str, overrides: list[str], length: int = 16) -> None:
    """Pretrain (or resume) the tiny recipe on ``RandomImages(length)`` in ``out``, one thread.

    The body of the forked training processes that the SIGKILL tests kill; it lives here, in a
    module the fork server preloads, so a child starts without importing anything.
    """
    import threading

    from tqdm import tqdm

    from dinoflow.storage import Storage
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    torch.set_num_threads(1)
    # a thread lock for the progress bars: tqdm's default is a named semaphore, which a killed
    # process leaves behind for the resource tracker to clean up (with a warning)
    tqdm.set_lock(threading.RLock())
    pretrain(tiny_config(out, *overrides), RandomImages(length), collate_samples, Storage())


def fork_server() -> Any:
    """A multiprocessing context whose children fork from a server that has already imported
    torch and the trainer (about 0.1 s a start instead of about 4 s for a fresh interpreter), and
    matplotlib, with which a finished run draws its training curves.

    The server never runs a tensor op, so its children start with no OpenMP pool to inherit.
    """
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "trainer.engine", "evaluators.visualize", "tests.reliability.helpers"])
    return context


def assert_same_training_state(got: dict, want: dict, label: str, atol: float = 1e-6) -> None:
    """Two pretraining checkpoints hold the same step, weights, teacher center and optimizer state."""
    assert got["step"] == want["step"] and got["images_seen"] == want["images_seen"], label
    for part in ("student", "teacher", "objective"):
        assert got[part].keys() == want[part].keys(), f"{label}: {part} keys"
        for key, tensor in want[part].items():
            torch.testing.assert_close(got[part][key], tensor, rtol=0, atol=atol, msg=f"{label}: {part}.{key}")
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys(), label
    for index, slots in want["optimizer"]["state"].items():
        for name, tensor in slots.items():
            torch.testing.assert_close(got["optimizer"]["state"][index][name], tensor, rtol=0, atol=atol,
                                       msg=f"{label}: optimizer state {index}.{name}")


def image_shard(first: int, count: int, size: int = 16) -> bytes:
    """An uncompressed tar shard of ``count`` random JPEGs (``<n>.jpg`` + ``<n>.cls``), seeded by ``n``."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for n in range(first, first + count):
            pixels = np.random.default_rng(n).integers(0, 256, (size, size, 3), dtype=np.uint8)
            image = io.BytesIO()
            Image.fromarray(pixels).save(image, format="JPEG")
            for name, data in ((f"{n:06d}.jpg", image.getvalue()), (f"{n:06d}.cls", str(n % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the body with one intra-op thread: a tiny model on a shared 2-core machine is several
    times faster so than with two threads that spin-wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
