"""``benchmarks/gpu_gaps.py``: the device's busy time and idle gaps from a profiler trace, checked
against a brute-force count on random intervals, on a written trace and on a real (CPU) export."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_gaps  # noqa: E402


@pytest.mark.parametrize("seed", range(5))
def test_busy_time_and_gaps_match_a_count_on_a_microsecond_grid(seed: int) -> None:
    """Overlapping intervals from several streams: busy time, span and each gap's position and
    length equal a brute-force marking of a 1-us grid."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 2000, size=40)
    lengths = rng.integers(1, 60, size=40)
    intervals = sorted((float(s), float(s + n), f"k{i}") for i, (s, n) in enumerate(zip(starts, lengths)))
    grid = np.zeros(2100, dtype=bool)
    for start, end, _ in intervals:
        grid[int(start):int(end)] = True
    first, last = int(min(s for s, _, _ in intervals)), int(max(e for _, e, _ in intervals))
    idle = ~grid[first:last]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], idle.astype(np.int8), [0]])))
    expected_gaps = [(first + a, b - a) for a, b in zip(edges[::2], edges[1::2])]

    line = gpu_gaps.timeline(intervals)
    assert line.busy_us == grid.sum() and line.span_us == last - first and line.start_us == first
    assert [(g.start_us, g.length_us) for g in line.gaps] == expected_gaps
    assert line.idle_us == sum(n for _, n in expected_gaps)
    classes = gpu_gaps.gap_classes(line.gaps)  # each gap counted once, in the class of its length
    bounds = [0.0] + [below for below, _ in gpu_gaps.GAP_CLASSES]
    assert classes == [(label, sum(low <= n < high for _, n in expected_gaps),
                        float(sum(n for _, n in expected_gaps if low <= n < high)))
                       for (high, label), low in zip(gpu_gaps.GAP_CLASSES, bounds)]


def test_the_report_names_the_kernels_around_the_largest_gap(tmp_path: Path) -> None:
    """Only device events count (a host operator spanning a gap does not fill it); a copy on
    another stream overlapping a kernel does not open a gap; the largest gap comes first with the
    event that ended last before it and the one after; a gzipped trace reads as the plain one."""
    def event(cat: str, name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {}}

    trace = {"traceEvents": [
        event("cpu_op", "aten::mm", 0.0, 10_000.0),  # host side: ignored
        event("kernel", "gemm", 100.0, 400.0),  # 100-500
        event("gpu_memcpy", "Memcpy HtoD", 300.0, 300.0),  # 300-600, overlapping: busy 100-600
        event("kernel", "multi_tensor_apply_kernel", 2600.0, 100.0),  # a 2 ms gap before it
        event("gpu_memset", "Memset", 2800.0, 200.0),  # a 0.1 ms gap before it; ends at 3000
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 5000.0},  # not a complete event
    ]}
    path = tmp_path / "trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps(trace).encode()))
    assert gpu_gaps.load_trace(path) == trace
    text = gpu_gaps.gap_report(gpu_gaps.load_trace(path), steps=2)
    lines = text.splitlines()
    # busy 500 + 100 + 200 = 800 us of a 2900 us span, over 2 steps
    assert lines[0] == "device busy 0.40 ms of 1.45 ms a step: idle 1.05 ms a step (72.4 %) in 2 gaps (1 a step)"
    assert lines[1] == ("  by length: under 10 us 0 a step, 0.00 ms; 10-100 us 0 a step, 0.00 ms; "
                        "0.1 ms and over 1 a step, 1.05 ms")  # 2 ms and 0.1 ms, over 2 steps
    assert lines[2] == "    2.000 ms at +    0.50 ms  after 'Memcpy HtoD'  before 'multi_tensor_apply_kernel'"
    assert lines[3] == "    0.100 ms at +    2.60 ms  after 'multi_tensor_apply_kernel'  before 'Memset'"


def test_a_trace_without_device_work_says_so_and_names_what_it_holds(tmp_path: Path) -> None:
    """A real trace exported by torch's profiler on this CPU: read back, no device events, and
    the report lists the categories it found instead of dividing by zero."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        torch.randn(64, 64) @ torch.randn(64, 64)
    path = tmp_path / "cpu.json"
    profiler.export_chrome_trace(str(path))
    text = gpu_gaps.gap_report(gpu_gaps.load_trace(path), steps=1)
    assert text.startswith("no device events in the trace (categories: ") and "cpu_op" in text


def test_a_failing_timeline_is_reported_not_raised(tmp_path: Path) -> None:
    """``train_step.py``'s timeline is a diagnostic beside the measured rows: where it cannot be
    recorded (here: this CPU build's profiler has no CUDA activity to record) its text says why,
    nothing raises and no trace file is left."""
    import train_step

    text = train_step.device_timeline(lambda: None, torch.device("cpu"), str(tmp_path / "profile.txt"))
    assert text.startswith("not recorded (") and text.endswith(")")
    assert not list(tmp_path.iterdir())
