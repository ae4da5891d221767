"""Progress bars for long loops, one way for the whole project.

Why: every long loop shows progress, but logs of batch jobs (CI, Kubernetes pods) must not fill
with carriage-return redraws, so bars draw only on a terminal unless asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

_T = TypeVar("_T")


def progress(
    items: Iterable[_T], desc: str, total: int | None = None, unit: str = "it", force: bool = False
) -> tqdm:
    """Wrap ``items`` in a tqdm bar on stderr; silent when stderr is not a terminal."""
    return tqdm(
        items,
        desc=desc,
        total=total,
        unit=unit,
        dynamic_ncols=True,
        disable=not (force or sys.stderr.isatty()),
    )
