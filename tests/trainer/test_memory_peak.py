"""``benchmarks/memory_peak.py``'s trace replay on a hand-made allocator trace (the recorder itself
is CUDA's: on a GPU it runs inside ``benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "memory_peak", Path(__file__).resolve().parents[2] / "benchmarks" / "memory_peak.py")
memory_peak = sys.modules["memory_peak"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(memory_peak)
ROOT = "/repo"


def frames(*places: tuple[str, int, str]) -> list[dict[str, object]]:
    return [{"filename": f, "line": line, "name": name} for f, line, name in places]


def event(action: str, addr: int, size: int, *places: tuple[str, int, str]) -> dict[str, object]:
    return {"action": action, "addr": addr, "size": size, "frames": frames(*places)}


HEAD = ("/repo/trainer/heads.py", 10, "forward")
STEP = ("/repo/trainer/engine.py", 50, "step")
TORCH = ("/lib/torch/functional.py", 3, "linear")


def test_peak_and_what_is_alive_then() -> None:
    events = [
        event("alloc", 1, 100, TORCH, HEAD, STEP),
        event("alloc", 2, 300, STEP),
        event("free_requested", 1, 100, TORCH, HEAD, STEP),  # still allocated until completed
        event("alloc", 3, 50, TORCH),  # peak: 1000 + 100 + 300 + 50
        event("free_completed", 1, 100, TORCH, HEAD, STEP),
        event("free_completed", 9, 200, STEP),  # a block from before the recording
        event("alloc", 4, 120, STEP),
    ]
    peak, alive = memory_peak.live_at_peak(events, baseline=1000, root=ROOT)
    assert peak == 1450
    assert alive == {"(allocated before the step)": 1000, "trainer/heads.py:10 forward < trainer/engine.py:50 step": 100,
                     "trainer/engine.py:50 step": 300, "/lib/torch/functional.py:3 linear": 50}


def test_a_peak_before_the_step_allocates_keeps_the_baseline() -> None:
    events = [event("free_completed", 9, 400, STEP), event("alloc", 1, 100, STEP)]
    peak, alive = memory_peak.live_at_peak(events, baseline=1000, root=ROOT)
    assert peak == 1000 and alive == {"(allocated before the step)": 1000}
