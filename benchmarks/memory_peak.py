"""What is alive at a step's peak of CUDA memory, and where it was allocated.

Why: ``max_memory_allocated`` says how high a step goes, not what fills it; to cut a peak one needs
the tensors alive at that moment. :func:`record_peak` runs the step once under the caching
allocator's history recorder (every allocation and free with its Python stack) and
:func:`live_at_peak` replays that trace: memory allocated before the recording counts as one
baseline, each allocation adds, each completed free subtracts, and the tensors alive at the
highest point are summed by the innermost stack frame in this repository.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

REPO = str(Path(__file__).resolve().parents[1])


def where(frames: Iterable[Mapping[str, Any]], root: str = REPO, depth: int = 2) -> str:
    """``file:line function`` of the ``depth`` innermost frames under ``root`` (the recorder lists
    the innermost frame first), joined by `` < `` (callee < caller); the innermost frame of all
    if none is under ``root``."""
    frames = list(frames)
    ours = [f"{Path(f['filename']).relative_to(root)}:{f['line']} {f['name']}"
            for f in frames if str(f.get("filename", "")).startswith(root + "/")]
    if ours:
        return " < ".join(ours[:depth])
    return f"{frames[0]['filename']}:{frames[0]['line']} {frames[0]['name']}" if frames else "(no stack)"


def live_at_peak(events: list[Mapping[str, Any]], baseline: int, root: str = REPO) -> tuple[int, Counter[str]]:
    """The peak of allocated bytes over ``events`` (the recorder's ``device_traces`` of one device)
    starting from ``baseline`` bytes, and the bytes alive then by :func:`where` they were
    allocated (``baseline`` under "(allocated before the step)").

    An ``alloc`` adds its size, a ``free_completed`` subtracts it (``free_requested`` only marks a
    block to be freed once its stream is done with it); a free of a block allocated before the
    recording lowers the baseline share.
    """
    def replay(stop: int | None) -> tuple[int, int, dict[int, Mapping[str, Any]], int]:
        current, peak, peak_at, live, before = baseline, baseline, -1, {}, baseline
        for position, event in enumerate(events[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                current += event["size"]
            elif event["action"] == "free_completed":
                if live.pop(event["addr"], None) is None:
                    before -= event["size"]
                current -= event["size"]
            if current > peak:
                peak, peak_at = current, position
        return peak, peak_at, live, before

    peak, peak_at, _, _ = replay(None)
    _, _, live, before = replay(peak_at + 1)
    alive: Counter[str] = Counter({"(allocated before the step)": before})
    for event in live.values():
        alive[where(event.get("frames", ()), root)] += event["size"]
    return peak, alive


def record_peak(step: Callable[[], None], device: torch.device) -> str:
    """Run ``step`` once with the allocator's history recorded; a table of what is alive at its
    peak, largest first (CUDA only: the recorder is the CUDA caching allocator's). A diagnostic:
    if the recorder fails, the table says why instead of failing the benchmark it serves."""
    try:
        return _record_peak(step, device)
    except (RuntimeError, KeyError, IndexError) as error:
        return f"memory recording failed: {type(error).__name__}: {error}"


def _record_peak(step: Callable[[], None], device: torch.device) -> str:
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][device.index or 0]
    peak, alive = live_at_peak(events, baseline)
    lines = [f"peak {peak / 2**20:.0f} MiB allocated ({len(events)} allocator events); alive at the peak, "
             f"by where it was allocated:"]
    lines += [f"{size / 2**20:>10.1f} MiB  {place}" for place, size in alive.most_common(30)]
    return "\n".join(lines)
