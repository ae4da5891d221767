"""A feature pass saved in parts, so that a rerun after a lost pod resumes it.

Why: the classification benchmarks' feature pass over ImageNet (1.28M train images, four probe
views) takes the better part of an hour on a GPU, and a preempted evaluate task started it over
from the first image. With :class:`FeatureParts` the pass runs ``rows`` images at a time and saves
each part, ``<uri>/<split>/part-00000.safetensors`` (features, labels, the part's undecodable
images, the first test images' pixels), atomically; a rerun loads the parts it finds and computes
the rest. ``<uri>/identity.json`` says what the features are of (the backbone's digest and the
pass's settings): a folder made for anything else is refused, never mixed in.

Saved or not, a pass runs in parts (:func:`in_parts`) that :func:`join_rows` copies into the split's
tensors as they come, so a split's features are held once, not gathered and then concatenated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from dinoflow.progress import progress
from dinoflow.storage import Storage, claim, join_uri

PART_ROWS = 16384  # images per part: ~20 s of a ViT-L/14 pass on a GPU, 330 MB of its probe views


def tensors_digest(tensors: Mapping[str, Tensor], prefix: bytes = b"") -> str:
    """sha256 of ``prefix`` and every tensor's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256(prefix)
    for name, tensor in tensors.items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_digest(backbone: nn.Module) -> str:
    """sha256 of the backbone's state (:func:`tensors_digest`)."""
    return tensors_digest(backbone.state_dict())


@dataclass(frozen=True)
class FeatureParts:
    """Where a feature pass keeps its parts (``uri``), what they are of (``identity``, JSON-able)
    and how many images each holds."""

    storage: Storage
    uri: str
    identity: dict[str, Any]
    rows: int = PART_ROWS

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"rows per part must be >= 1, got {self.rows}")

    def claim(self) -> None:
        """Write ``identity.json``, or check that the one there names the same features
        (:func:`~dinoflow.storage.claim`)."""
        claim(self.storage, self.uri, self.identity, "features of another pass")

    def _part(self, split: str, index: int) -> str:
        return join_uri(self.uri, split, f"part-{index:05d}.safetensors")

    def load(self, split: str, index: int) -> dict[str, Tensor] | None:
        """Part ``index`` of ``split`` when saved, else None."""
        path = self._part(split, index)
        return load_tensors(self.storage.read_bytes(path)) if self.storage.exists(path) else None

    def save(self, split: str, index: int, tensors: dict[str, Tensor]) -> None:
        data = save_tensors({name: tensor.contiguous() for name, tensor in tensors.items()})
        self.storage.write_bytes(self._part(split, index), data)


def in_parts(split: str, count: int, parts: FeatureParts | None,
             make: Callable[[list[int]], dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """``make(rows)`` over rows ``0 .. count - 1`` of ``split`` in pieces of ``parts.rows`` (or
    :data:`PART_ROWS` without ``parts``), yielded in order as they are made; with ``parts`` each is
    saved as it is made, or loaded instead when an earlier pass saved it."""
    size = parts.rows if parts is not None else PART_ROWS
    pieces = [list(range(start, min(start + size, count))) for start in range(0, count, size)]
    for index, rows in enumerate(pieces if len(pieces) < 2 else progress(pieces, f"{split} parts", unit="part")):
        part = parts.load(split, index) if parts is not None else None
        if part is None:
            part = make(rows)
            if parts is not None:
                parts.save(split, index, part)
        yield part


def join_rows(pieces: Iterable[dict[str, Tensor]], most: int) -> dict[str, Tensor]:
    """Each key's rows of ``pieces`` (``most`` at most in all: an undecodable image has none) in
    one tensor, filled piece by piece as they come: the pieces are never all held beside the whole
    (ImageNet's probe views with ViT-L/14 are 26 GB; gathered, then concatenated, they took 52)."""
    joined: dict[str, Tensor] = {}
    start = 0
    for piece in pieces:
        rows = {len(tensor) for tensor in piece.values()}
        if len(rows) != 1 or start + min(rows) > most:
            raise ValueError(f"a piece of {sorted(rows)} rows after {start}: its tensors must agree, {most} at most")
        for key, tensor in piece.items():
            if key not in joined:
                joined[key] = tensor.new_empty((most, *tensor.shape[1:]))
            joined[key][start : start + len(tensor)] = tensor
        start += rows.pop()
    return {key: tensor[:start] for key, tensor in joined.items()}


def text_tensor(text: str) -> Tensor:
    """``text`` as a uint8 tensor of its UTF-8 bytes: a part file holds tensors only."""
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def text_of(tensor: Tensor) -> str:
    """The text :func:`text_tensor` stored."""
    return bytes(tensor.tolist()).decode()
