"""One rank of a 2-rank run whose evaluations (rank 0's alone) outlast the process group's collective
timeout (``distributed.timeout_seconds``): started by ``torchrun`` from
``test_distributed.py::test_an_evaluation_longer_than_the_collective_timeout_finishes``.

Usage: slow_main_rank.py OUT SECONDS (each evaluation sleeps SECONDS; the timeout is 3 s).
"""

from __future__ import annotations

import sys
import time

import torch

from dinoflow.config import PretrainConfig, load_config
from dinoflow.storage import Storage
from tests.trainer.test_distributed import SMALL
from trainer.data.datasets import Sample, collate_samples
from trainer.engine import pretrain


class RandomImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> Sample:
        pixels = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(index))
        return Sample(image=pixels, label=-1, key=f"img{index}")


def slow(seconds: float):
    def evaluate(backbone: torch.nn.Module, step: int) -> dict[str, float]:
        time.sleep(seconds)
        return {"evaluated_at": float(step)}

    return evaluate


if __name__ == "__main__":
    out, seconds = sys.argv[1], float(sys.argv[2])
    torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, "tiny", [*SMALL, "optim.batch_size=2", "max_steps=2", "eval.every_steps=1",
                                              "distributed.strategy=fsdp2", "distributed.timeout_seconds=3",
                                              f"out={out}"])
    summary = pretrain(cfg, RandomImages(), collate_samples, Storage(), evaluate=slow(seconds))
    print("finished", summary["steps"], summary["final"], flush=True)
