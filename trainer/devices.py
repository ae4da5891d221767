"""The torch device a command runs on, checked before any work starts.

Why a module of its own: training, evaluation, curation and serving all take a device name, and
the pipeline's evaluate stage ships only the modules it imports (a component's code travels in
one container argument), so the check lives apart from the training engine.
"""

from __future__ import annotations

import torch


def available_device(name: str) -> torch.device:
    """The device named, refused in one line where this machine has none of it (a GPU recipe
    started on a CPU-only machine would otherwise fail deep in its first step)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; allowed: cpu, cuda, cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device = {name!r}, but this machine has no CUDA device (torch {torch.__version__}); "
                         "set device=cpu to run here")
    return device
