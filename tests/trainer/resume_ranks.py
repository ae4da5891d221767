"""``dinoflow COMMAND ...`` in one ``torchrun`` rank with the rank's reads recorded: started by
``torchrun`` from the tests that check that only the main rank reads the checkpoint a run resumes
from, and the weights it starts from (``test_distributed_resume.py``).

Usage: ``torchrun ... resume_ranks.py RECORDS COMMAND [ARGS ...]``. Runs ``dinoflow COMMAND ARGS``
(as ``dinoflow --nproc N`` runs each rank) and appends to ``RECORDS.rank<R>.jsonl`` a line per call
of ``Storage.read_bytes`` (``{"read": uri}``), of ``Storage.read_range`` (``{"range": uri, "size": bytes
read}``) and of ``torch.load`` (``{"load": size, "by": caller}``: the tensor elements of what it
returned, :func:`tests.trainer.checkpoint_ranks.size`, and the name of the function that called it,
``_load_from_bytes`` for a tensor unpickled from a broadcast object), as each returns: the rank
ends in ``os._exit`` (``leave_rank``), so nothing is left to write at its end. The calls are the
real ones, only recorded.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import torch

from dinoflow.storage import Storage
from tests.trainer.checkpoint_ranks import size


def main(records: str, args: list[str]) -> None:
    log = Path(f"{records}.rank{os.environ['RANK']}.jsonl")
    read_bytes, read_range, load = Storage.read_bytes, Storage.read_range, torch.load

    def note(entry: dict[str, Any]) -> None:
        with log.open("a") as file:
            file.write(json.dumps(entry) + "\n")

    def recorded_read(self: Storage, uri: str) -> bytes:
        data = read_bytes(self, uri)
        note({"read": str(uri)})
        return data

    def recorded_range(self: Storage, uri: str, start: int, size: int) -> bytes:
        data = read_range(self, uri, start, size)
        note({"range": str(uri), "size": len(data)})
        return data

    def recorded_load(*args: Any, **kwargs: Any) -> Any:
        result = load(*args, **kwargs)
        note({"load": size(result), "by": sys._getframe(1).f_code.co_name})
        return result

    Storage.read_bytes, Storage.read_range, torch.load = recorded_read, recorded_range, recorded_load
    sys.argv = ["dinoflow", *args]
    runpy.run_module("pipelines.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
