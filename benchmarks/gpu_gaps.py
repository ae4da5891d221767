"""Where does the GPU sit idle between kernels? A gap report from a torch profiler trace.

A step whose kernels add up to less than its wall time leaves the GPU waiting for the host
somewhere: after the step's one host sync, while the host launches the next step's first kernels,
or wherever Python queues work more slowly than the GPU runs it (many small kernels: the
optimizer's parameter groups, the eager glue between compiled blocks). The profiler's kernel
table cannot show this; its timeline can. This reads a Chrome trace written by
``torch.profiler.profile.export_chrome_trace`` (``benchmarks/train_step.py --profile`` writes one
for the compiled step, recorded with device activity only, so that the profiler's own host
overhead does not open gaps of its own), merges the device's busy intervals (kernels, copies and
sets, on every stream) and prints the idle time per step and the largest gaps, each with the
kernels on either side (what ran before the GPU waited, and what it waited for), and the idle time
by gap length (``GAP_CLASSES``), which tells the causes apart: gaps of a few microseconds lie between
kernels already queued, so their sum grows with the number of kernels and only fewer kernels
(fusion, CUDA graphs) shrink it; tens of microseconds are the host queueing eager work more slowly
than the GPU runs it; a tenth of a millisecond and more is the GPU waiting for the host (the sync,
the next step's first launches). Asserts nothing.

    python benchmarks/gpu_gaps.py OUT/profile_small_trace.json.gz --steps 2
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})  # the trace's device work
GAP_CLASSES = ((10.0, "under 10 us"), (100.0, "10-100 us"), (float("inf"), "0.1 ms and over"))  # (below, label)


@dataclass(frozen=True)
class Gap:
    """An interval with no device work: its start (us, trace time), length (us) and the names of
    the last device event to end before it and the first to start after it."""

    start_us: float
    length_us: float
    before: str
    after: str


@dataclass(frozen=True)
class Timeline:
    """The device's first event's start, its busy time, the span from that start to its last
    event's end (us), and every gap between, in time order."""

    start_us: float
    busy_us: float
    span_us: float
    gaps: list[Gap]

    @property
    def idle_us(self) -> float:
        return self.span_us - self.busy_us


def load_trace(path: str | Path) -> dict[str, Any]:
    """A Chrome trace from ``.json`` or ``.json.gz``."""
    data = Path(path).read_bytes()
    return json.loads(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def device_intervals(trace: dict[str, Any]) -> list[tuple[float, float, str]]:
    """``(start, end, name)`` of every complete device event (``DEVICE_CATEGORIES``), by start."""
    intervals = [(float(event["ts"]), float(event["ts"]) + float(event.get("dur", 0.0)), str(event.get("name", "")))
                 for event in trace.get("traceEvents", [])
                 if event.get("ph") == "X" and event.get("cat") in DEVICE_CATEGORIES]
    return sorted(intervals)


def timeline(intervals: list[tuple[float, float, str]]) -> Timeline:
    """Busy time and gaps of ``intervals`` sorted by start (they may overlap: several streams)."""
    if not intervals:
        return Timeline(0.0, 0.0, 0.0, [])
    busy, gaps = 0.0, []
    run_start, run_end, last_name = intervals[0][0], intervals[0][1], intervals[0][2]
    for start, end, name in intervals[1:]:
        if start > run_end:
            busy += run_end - run_start
            gaps.append(Gap(run_end, start - run_end, last_name, name))
            run_start, run_end, last_name = start, end, name
        elif end >= run_end:
            run_end, last_name = end, name
    busy += run_end - run_start
    return Timeline(intervals[0][0], busy, run_end - intervals[0][0], gaps)


def gap_classes(gaps: list[Gap]) -> list[tuple[str, int, float]]:
    """``(label, gaps, idle us)`` of ``gaps`` in each length class of ``GAP_CLASSES`` (a gap falls in
    the first class whose bound it is below)."""
    totals = {label: [0, 0.0] for _, label in GAP_CLASSES}
    for gap in gaps:
        label = next(label for below, label in GAP_CLASSES if gap.length_us < below)
        totals[label][0] += 1
        totals[label][1] += gap.length_us
    return [(label, int(count), total) for label, (count, total) in totals.items()]


def gap_report(trace: dict[str, Any], steps: int, top: int = 8) -> str:
    """The device's busy and idle time per step in ``trace`` (``steps`` steps), the idle time by gap
    length, and its ``top`` largest gaps, as text."""
    line = timeline(device_intervals(trace))
    if not line.span_us:
        seen = sorted({str(event.get("cat")) for event in trace.get("traceEvents", [])})
        return f"no device events in the trace (categories: {', '.join(seen) or 'none'})"
    per_step = 1000 * steps
    lines = [f"device busy {line.busy_us / per_step:.2f} ms of {line.span_us / per_step:.2f} ms a step: idle "
             f"{line.idle_us / per_step:.2f} ms a step ({100 * line.idle_us / line.span_us:.1f} %) in "
             f"{len(line.gaps)} gaps ({len(line.gaps) / steps:.0f} a step)",
             "  by length: " + "; ".join(f"{label} {count / steps:.0f} a step, {total / per_step:.2f} ms"
                                       for label, count, total in gap_classes(line.gaps))]
    for gap in sorted(line.gaps, key=lambda g: -g.length_us)[:top]:
        lines.append(f"  {gap.length_us / 1000:7.3f} ms at +{(gap.start_us - line.start_us) / 1000:8.2f} ms"
                     f"  after {gap.before[:60]!r}  before {gap.after[:60]!r}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a Chrome trace from torch's profiler (.json or .json.gz)")
    parser.add_argument("--steps", type=int, default=1, help="training steps the trace holds")
    parser.add_argument("--top", type=int, default=8, help="largest gaps to list")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    print(gap_report(load_trace(args.trace), args.steps, args.top))


if __name__ == "__main__":
    main()
