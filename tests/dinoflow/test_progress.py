"""Progress off a terminal: status lines at a bounded rate, none for a short loop; a bar on one."""

from __future__ import annotations

import io
import time

import pytest

from dinoflow import progress as progress_module
from dinoflow.progress import progress


class _Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def test_a_batch_job_log_gets_whole_status_lines_at_a_bounded_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    log = _Stream(terminal=False)
    monkeypatch.setattr(progress_module.sys, "stderr", log)
    for _ in progress(range(3), "short", log_every_s=5.0):
        pass
    assert log.getvalue() == ""  # a loop shorter than the interval says nothing

    start = time.perf_counter()
    bar = progress(range(20), "train", unit="step", log_every_s=0.2)
    for step in bar:
        time.sleep(0.05)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")  # each step, as the loops do: no line of its own
    elapsed = time.perf_counter() - start
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert 2 <= len(lines) <= elapsed / 0.2 + 2, lines
    assert all(line.startswith("train: ") for line in lines)
    assert lines[-1].startswith("train: 20/20 step") and lines[-1].endswith("], loss=0.050")
    statuses = [line.split(" [")[0] + line.split("]")[-1] for line in lines]  # the times left out
    assert len(set(statuses)) == len(statuses), lines  # the closing redraw does not repeat the last line


def test_a_terminal_gets_a_redrawn_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Stream(terminal=True)
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    bar = progress(range(3), "train", log_every_s=5.0)
    for _ in bar:
        pass
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
