"""``distributed_steps.py`` with each rank's checkpoint calls recorded: started by ``torchrun`` from
``test_distributed_resume.py::test_only_the_main_rank_keeps_and_serialises_a_checkpoint``.

Usage: as ``distributed_steps.py`` (with ``--save-at``). Each rank also writes ``OUT.rank<R>.json``:
every call of ``checkpoint_bytes`` and of the strategy's ``full_state_dict_on_main`` and
``optimizer_state``, in order, with the size of what it returned (the bytes of a payload, the
tensor elements of a state dict; null for None). The calls are the real ones, only recorded.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.trainer import distributed_steps
from trainer.strategy import Strategy, build_strategy, leave_rank


def size(value: Any) -> int | None:
    """The bytes of ``value`` (a serialised payload, a storage), else the tensor elements it holds;
    None for None."""
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, (torch.UntypedStorage, torch.TypedStorage)):
        return value.nbytes()
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (dict, list, tuple)):
        return sum(size(v) or 0 for v in (value.values() if isinstance(value, dict) else value))
    return None if value is None else 0


def recorded(function: Callable, name: str, calls: list[dict[str, Any]]) -> Callable:
    """``function``, appending ``{"call": name, "size": size(result)}`` to ``calls`` at each return."""
    def call(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        calls.append({"call": name, "size": size(result)})
        return result

    return call


def main(out: str, args: list[str]) -> None:
    calls: list[dict[str, Any]] = []

    def recording_strategy(*args: Any, **kwargs: Any) -> Strategy:
        strategy = build_strategy(*args, **kwargs)
        for name in ("full_state_dict_on_main", "optimizer_state"):
            setattr(strategy, name, recorded(getattr(strategy, name), name, calls))
        return strategy

    distributed_steps.build_strategy = recording_strategy
    distributed_steps.checkpoint_bytes = recorded(distributed_steps.checkpoint_bytes, "checkpoint_bytes", calls)
    distributed_steps.main(out, int(args[0]), int(args[1]), args[2:])
    Path(f"{out}.rank{os.environ['RANK']}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    leave_rank()
