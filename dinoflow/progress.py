"""Progress bars for long loops, one way for the whole project.

Why: every long loop shows progress. On a terminal that is a tqdm bar; in the log of a batch job
(CI, a Kubernetes pod, a KFP task) redraws would pile up carriage returns on one line, and no
output at all leaves a user of an hour-long job blind until it ends, so there the same bar
writes a plain status line at most every ``log_every_s`` seconds, and none for a shorter loop.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import TextIO, TypeVar

from tqdm.auto import tqdm

_T = TypeVar("_T")

LOG_EVERY_S = 60.0  # off a terminal: a status line at most this often
_LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
_TIMES = re.compile(r" \[[^\]]*\]")


class _Lines:
    """tqdm's redraws (``"\\r" + status``) written as whole lines, a status once (the closing redraw
    of a loop whose last line was already its end differs only in its times)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        status = _TIMES.sub("", line)
        if line and status != self.last:
            self.stream.write(line + "\n")
            self.last = status

    def flush(self) -> None:
        self.stream.flush()


class _StatusLines(tqdm):
    """tqdm off a terminal: a new postfix (a loop's loss, each step) waits for the next status
    line instead of drawing one."""

    def set_postfix(self, ordered_dict: object = None, refresh: bool = True, **kwargs: object) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(
    items: Iterable[_T], desc: str, total: int | None = None, unit: str = "it", force: bool = False,
    log_every_s: float = LOG_EVERY_S,
) -> tqdm:
    """Wrap ``items`` in a tqdm bar on stderr if it is a terminal (or ``force``), else in status
    lines on stderr, the first after ``log_every_s`` seconds, then at most that often, and the last
    when the loop ends (see the module docstring)."""
    if force or sys.stderr.isatty():
        return tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True)
    return _StatusLines(items, desc=desc, total=total, unit=unit, file=_Lines(sys.stderr), bar_format=_LINE_FORMAT,
                        mininterval=log_every_s, maxinterval=log_every_s, delay=log_every_s)
