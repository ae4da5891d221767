"""What a piece of training code reads back from the device, observed on CPU.

On a GPU each such read waits for all the work queued before it, so the host stops queueing and
the GPU then idles while the host catches up: a step should read back once, its losses
(``trainer.engine.StepLosses.read``). CPU tensors never wait, so the reads are counted by what
would wait: an operator that needs a tensor's value on the host (``item``, ``bool``, ``float``:
``_local_scalar_dense``) or whose output's shape depends on values (``nonzero``, boolean
indexing, ``unique`` ...), seen by a dispatch mode; and ``tolist``, ``cpu`` and ``numpy``, which
do not pass the dispatcher, seen by wrapping them.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]

# operators that wait for a device's values: a value read, or an output sized by values
WAITING_OPERATORS = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "bincount", "is_nonzero", "equal", "allclose",
})
COPIES_TO_HOST = ("tolist", "cpu", "numpy")


def _caller() -> str:
    """``path:function`` of the innermost frame of this repository's code (not torch's, not this file's)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.is_relative_to(ROOT) and ".venv" not in path.parts and path != Path(__file__).resolve():
            return f"{path.relative_to(ROOT)}:{frame.name}"
    return "torch"


class _WaitingOperators(TorchDispatchMode):
    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in (args[1] or ()))
        sized_by_repeats = name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and len(args) == 1 and (
            kwargs or {}).get("output_size") is None  # repeat_interleave(repeats): its length is repeats.sum()
        if name in WAITING_OPERATORS or boolean_index or sized_by_repeats:
            self.reads.append(f"{name} in {_caller()}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """The reads back to the host made inside the block, each as ``"<what> in <path>:<function>"``."""
    reads: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for method in COPIES_TO_HOST:
            def counted(tensor: torch.Tensor, *args, _method=method, _real=getattr(torch.Tensor, method), **kwargs):
                reads.append(f"{_method} in {_caller()}")
                return _real(tensor, *args, **kwargs)

            patch.setattr(torch.Tensor, method, counted)
        with _WaitingOperators(reads):
            yield reads
